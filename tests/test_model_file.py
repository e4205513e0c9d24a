"""A model file is data, never code: the metadata of an ``encoder.safetensors`` reaches ``timm.create_model``
only as a plain timm name and architecture arguments (issue 18, item 1).

The control test runs a crafted file's ``checkpoint_path`` through timm with pickle loading made unsafe (what
timm < 1.0.26 did by default) and sees the payload run; every refusal test keeps that unsafe loader in place and
proves that ``simclr-tau knn FILE`` stops with one ``error:`` line naming the file and the key, before
``timm.create_model`` is called and before any file is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch

from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.models.encoder import build_encoder, check_backbone_kwargs
from simclr_tau.models.export import FORMAT, load_encoder, read_metadata, save_encoder

MODEL = {"backbone": "resnet10t", "backbone_kwargs": {}, "small_stem": True, "proj_hidden_dim": 32, "proj_dim": 16,
         "proj_layers": 2, "proj_bn": True, "sync_bn": False}


class _ShellPayload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    """(a pickle that writes ``marker`` when unpickled, marker)."""
    path, marker = tmp_path / "payload.pth", tmp_path / "payload_ran"
    torch.save({"state_dict": _ShellPayload(marker)}, path)
    return path, marker


@pytest.fixture
def vulnerable_timm(monkeypatch) -> list:
    """timm as it was before 1.0.26 (``torch.load`` with ``weights_only=False``), and a spy on
    ``timm.create_model``: returns the list of the calls it receives."""
    import timm.models._helpers as helpers

    def unsafe_load(checkpoint_path, map_location="cpu", weights_only=True, **kwargs):
        return torch.load(checkpoint_path, map_location=map_location, weights_only=False)

    monkeypatch.setattr(helpers, "_torch_load", unsafe_load)
    calls: list = []
    real = timm.create_model

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    return calls


@pytest.fixture(scope="module")
def weights() -> dict:
    """resnet10t weights (small stem, 1 channel), built once before any test's spy is in place."""
    from simclr_tau.models.encoder import encoder_state_dict

    encoder, _ = build_encoder(load_config(None, ["model.backbone=resnet10t"]).model, 1)
    return encoder_state_dict(encoder)


@pytest.fixture
def craft(weights):
    """``craft(path, model=None, header=None)``: an encoder file with real weights and the given metadata
    (``model`` a JSON-able value or raw text, default MODEL; ``header`` replaces keys, a value None drops one)."""
    from safetensors.torch import save_file

    def write(path: Path, model: dict | str | list | None = None, header: dict | None = None) -> Path:
        model = MODEL if model is None else model
        meta = {"format": FORMAT, "model": model if isinstance(model, str) else json.dumps(model), "in_chans": "1",
                "image_size": "16", "mean": "[0.5]", "std": "[0.25]", **(header or {})}
        save_file(weights, str(path), metadata={k: v for k, v in meta.items() if v is not None})
        return path

    return write


def knn_error(capsys, path: Path) -> str:
    """``simclr-tau knn PATH --data synthetic``: assert exit 2 with one ``error:`` line, no traceback; return it."""
    from simclr_tau.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["knn", str(path), "--data", "synthetic", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_the_payload_is_live_through_timm_checkpoint_path(payload, vulnerable_timm) -> None:
    """The control: handed to timm unchecked, a ``checkpoint_path`` runs the payload."""
    path, marker = payload
    with pytest.raises(Exception):  # the payload runs, then timm finds no weights in what it unpickled
        timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1, checkpoint_path=str(path))
    assert marker.exists()


def _steering(pickle_path: Path) -> dict:
    p = str(pickle_path)
    return {
        "checkpoint_path": p,
        "pretrained_cfg_overlay": {"file": p},
        "pretrained_cfg": {"file": p},
        "pretrained": True,
        "features_only": True,
        "cache_dir": str(pickle_path.parent),
        "file": p,
        "url": f"file://{p}",
        "hf_hub_id": "timm/resnet18.a1_in1k",
        "pretrained_strict": False,
        "model_cfg": {"layers": [1, 1, 1, 1]},
        "pruned": True,
        "init_checkpoint": p,  # not a timm name: refused as path-like (a part is 'checkpoint')
        "weights_path": p,  # ends in 'path'
    }


@pytest.mark.parametrize("key", list(_steering(Path("/x"))))
def test_a_loader_steering_key_in_the_metadata_is_refused_before_timm(tmp_path: Path, capsys, payload,
                                                                     craft, vulnerable_timm, key: str) -> None:
    pickle_path, marker = payload
    value = _steering(pickle_path)[key]
    enc = craft(tmp_path / "encoder.safetensors", {**MODEL, "backbone_kwargs": {"drop_path_rate": 0.0, key: value}})
    line = knn_error(capsys, enc)
    assert line.startswith(f"error: {enc}: metadata model.backbone_kwargs.{key} is refused: "), line
    assert vulnerable_timm == []  # timm.create_model never called
    assert not marker.exists()  # nothing unpickled


@pytest.mark.parametrize("value, problem", [
    ("/tmp/evil.pth", "looks like a path or URL"),  # a path as the value of an innocuous-looking key
    ("hf-hub:timm/resnet18", "looks like a path or URL"),
    ({"file": "x"}, "a dict value"),
    ([1, [2, 3]], "a nested container"),
], ids=["path", "hub-url", "dict", "nested-list"])
def test_a_value_that_is_not_plain_data_is_refused(tmp_path: Path, capsys, craft, vulnerable_timm, value,
                                                   problem) -> None:
    enc = craft(tmp_path / "encoder.safetensors", {**MODEL, "backbone_kwargs": {"act_layer": value}})
    line = knn_error(capsys, enc)
    assert line.startswith(f"error: {enc}: metadata model.backbone_kwargs.act_layer is refused: "), line
    assert problem in line
    assert vulnerable_timm == []


@pytest.mark.parametrize("name", ["local-dir:/tmp/model", "hf-hub:timm/resnet18.a1_in1k", "../resnet18"])
def test_a_model_name_with_a_source_or_a_path_is_refused(tmp_path: Path, capsys, craft, vulnerable_timm,
                                                           name: str) -> None:
    enc = craft(tmp_path / "encoder.safetensors", {**MODEL, "backbone": name})
    line = knn_error(capsys, enc)
    assert line.startswith(f"error: {enc}: metadata model.backbone={name!r} is refused: not a plain timm model name")
    assert vulnerable_timm == []


@pytest.mark.parametrize("model, header, expected", [
    ("{not json", {}, "metadata model is not valid JSON ("),
    (None, {"model": None}, "metadata has no 'model' key"),
    (None, {"in_chans": "three"}, "metadata in_chans='three' is not a positive integer"),
    (None, {"image_size": "-16"}, "metadata image_size='-16' is not a positive integer"),
    (None, {"mean": "[0.5, 0.5]"}, "metadata mean=[0.5, 0.5] is refused: must be a list of 1 finite numbers"),
    (None, {"std": "[0]"}, "metadata std=[0] is refused: must be a list of 1 positive finite numbers"),
    (None, {"loader": "x"}, "metadata key 'loader' is refused: not one of format, model, in_chans"),
    ({**MODEL, "checkpoint_path": "/x"}, {}, "metadata model.checkpoint_path is refused: not a ModelConfig field"),
    ({**MODEL, "small_stem": "yes"}, {}, "metadata model.small_stem='yes' is refused: must be a bool"),
    ({**MODEL, "proj_dim": True}, {}, "metadata model.proj_dim=True is refused: must be an int"),
    ({k: v for k, v in MODEL.items() if k != "backbone"}, {}, "metadata model has no backbone"),
    ([1, 2], {}, "metadata model must be a JSON object of ModelConfig fields, not list"),
    ({**MODEL, "backbone_kwargs": ["depth"]}, {}, "metadata model.backbone_kwargs=['depth'] is refused: must be a dict"),
], ids=["invalid-json", "no-model", "in_chans-three", "image_size-negative", "mean-length", "std-zero",
        "unknown-header-key", "unknown-model-key", "bool-as-str", "int-as-bool", "no-backbone", "model-not-object",
        "kwargs-not-dict"])
def test_malformed_metadata_is_one_line_naming_the_file_and_the_key(tmp_path: Path, craft, vulnerable_timm, model,
                                                                    header, expected: str) -> None:
    enc = craft(tmp_path / "encoder.safetensors", model, header)
    with pytest.raises(UserError) as exc:
        load_encoder(enc)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{enc}: {expected}"), msg
    assert vulnerable_timm == []


def test_an_unchecked_file_cannot_reach_timm_through_random_init_or_a_teacher(tmp_path: Path, payload, craft,
                                                                            vulnerable_timm) -> None:
    """``knn --random-init`` (metadata only, no weights) and a distillation teacher read the same checks."""
    from omegaconf import OmegaConf

    from simclr_tau.evaluation.targets import resolve_target
    from simclr_tau.train.teacher import load_teacher_encoder

    pickle_path, marker = payload
    enc = craft(tmp_path / "encoder.safetensors", {**MODEL, "backbone_kwargs": {"checkpoint_path": str(pickle_path)}})
    with pytest.raises(UserError, match=r"metadata model\.backbone_kwargs\.checkpoint_path is refused"):
        resolve_target(str(enc), data="synthetic", random_init=True)
    with pytest.raises(UserError, match=r"metadata model\.backbone_kwargs\.checkpoint_path is refused"):
        load_teacher_encoder(OmegaConf.create({"path": str(enc), "model": None}), 1)
    assert vulnerable_timm == [] and not marker.exists()


def test_a_config_cannot_steer_timm_either(payload, vulnerable_timm) -> None:
    """The same rule holds for ``model.backbone_kwargs`` in a config (a run directory's config.yaml is a file too)."""
    pickle_path, marker = payload
    cfg = load_config(None, ["model.backbone=resnet10t", f"model.backbone_kwargs={{checkpoint_path: {pickle_path}}}"])
    with pytest.raises(UserError, match=r"^model\.backbone_kwargs\.checkpoint_path is refused: it would make timm load"):
        build_encoder(cfg.model, 1)
    cfg = load_config(None, ["model.backbone=resnet10t", "model.backbone_kwargs={in_chans: 3}"])
    with pytest.raises(UserError, match=r"^model\.backbone_kwargs\.in_chans is refused: simclr_tau sets it"):
        build_encoder(cfg.model, 1)
    assert vulnerable_timm == [] and not marker.exists()


@pytest.mark.parametrize("backbone, kwargs", [
    ("resnet10t", {"channels": [8, 16, 32, 64], "drop_path_rate": 0.1}),  # the τ study's config shape
    ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2,
                              "global_pool": "avg", "class_token": False}),
], ids=["resnet-channels", "vit"])
def test_architecture_kwargs_are_accepted_and_the_export_round_trips(tmp_path: Path, backbone: str,
                                                                    kwargs: dict) -> None:
    cfg = load_config(None, [f"model.backbone={backbone}", "model.small_stem=false",
                             f"model.backbone_kwargs={json.dumps(kwargs)}"])
    assert check_backbone_kwargs(kwargs) == kwargs
    torch.manual_seed(0)
    encoder, _ = build_encoder(cfg.model, 1)
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, encoder, cfg.model, 1, 16, [0.5], [0.25])
    meta = read_metadata(path)
    assert meta["model"]["backbone_kwargs"] == kwargs and meta["in_chans"] == 1 and meta["std"] == [0.25]
    loaded, _ = load_encoder(path)
    x = torch.randn(2, 1, 16, 16)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_stem_pool_false_halves_the_stem_downsampling_and_round_trips(tmp_path: Path) -> None:
    """model.stem_pool=false: the ImageNet stem without its max-pool (28 px -> 14 px into stage 1, not 7)."""
    shapes = {}
    for pool in (True, False):
        cfg = load_config(None, ["model.backbone=resnet10t", "model.small_stem=false", f"model.stem_pool={pool}"])
        torch.manual_seed(0)
        encoder, _ = build_encoder(cfg.model, 1)
        x = torch.randn(2, 1, 28, 28)
        stem = encoder.maxpool(encoder.act1(encoder.bn1(encoder.conv1(x))))
        shapes[pool] = tuple(stem.shape[-2:])
    assert shapes == {True: (7, 7), False: (14, 14)}
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, encoder, cfg.model, 1, 28, [0.5], [0.25])
    assert read_metadata(path)["model"]["stem_pool"] is False
    loaded, _ = load_encoder(path)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_stem_pool_false_on_a_model_without_a_stem_pool_is_one_line() -> None:
    cfg = load_config(None, ["model.backbone=vit_tiny_patch16_224", "model.small_stem=false", "model.stem_pool=false"])
    with pytest.raises(UserError, match="has no stem max-pool"):
        build_encoder(cfg.model, 1)

"""The exported encoder as a timm user loads it (issue 19, item 2).

An export that plain timm can rebuild gets timm's ``config.json`` next to ``encoder.safetensors``:
``timm.create_model("local-dir:RUN", pretrained=True)`` (and the documented ``pretrained_cfg_overlay`` line on
the file alone) must give exactly ``load_encoder``'s features, and ``timm.data.resolve_data_config`` the encoder's
input size, mean and std, whose transform equals our evaluation transform. An export with a stem timm cannot
build (``model.small_stem``, ``model.stem_pool=false``) must be refused by timm, never load into the ImageNet stem
and give other features.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from simclr_tau.config import load_config
from simclr_tau.data.augment import eval_transform
from simclr_tau.models.encoder import build_encoder
from simclr_tau.models.export import NOT_TIMM_KEY, TIMM_CONFIG, load_encoder, read_metadata, save_encoder

MEAN, STD, SIZE = [0.2860], [0.3530], 28  # Fashion-MNIST's statistics: not ImageNet's


def export(tmp_path: Path, *overrides: str) -> tuple[Path, torch.nn.Module]:
    cfg = load_config(None, list(overrides))
    torch.manual_seed(0)
    encoder, _ = build_encoder(cfg.model, 1)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained encoder has
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    run = tmp_path / "run"
    run.mkdir()
    save_encoder(run / "encoder.safetensors", encoder, cfg.model, 1, SIZE, MEAN, STD)
    return run, encoder.eval()


def overlay_line(path: Path) -> torch.nn.Module:
    """The README's line for the weights file alone (no config.json), its arguments read from the metadata."""
    meta = read_metadata(path)
    m, c, s = meta["model"], meta["in_chans"], meta["image_size"]
    return timm.create_model(m["backbone"], pretrained=True, num_classes=0, in_chans=c, **m.get("backbone_kwargs", {}),
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=0, input_size=(c, s, s),
                                                         mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                                                         crop_pct=1.0, interpolation="bilinear"))


def expected_data_config() -> dict:
    return {"input_size": (1, SIZE, SIZE), "mean": tuple(MEAN), "std": tuple(STD), "crop_pct": 1.0,
            "interpolation": "bilinear", "crop_mode": "center"}


def data_config_of(model: torch.nn.Module) -> dict:
    cfg = timm.data.resolve_data_config({}, model=model)
    return {**cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


VIT = ("model.backbone_kwargs={img_size: 28, patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2, "
       "global_pool: avg, class_token: false}")


@pytest.mark.parametrize("overrides", [
    ["model.backbone=resnet10t", "model.small_stem=false"],
    ["model.backbone=resnet10t", "model.small_stem=false",
     "model.backbone_kwargs={channels: [8, 16, 32, 64], drop_path_rate: 0.1}"],
    ["model.backbone=resnet18", "model.small_stem=false"],
    ["model.backbone=vit_tiny_patch16_224", "model.small_stem=true", VIT],  # small_stem changes nothing in a ViT
], ids=["resnet10t", "resnet10t-channels", "resnet18", "vit"])
def test_plain_timm_loads_the_export_with_identical_features_and_preprocessing(tmp_path: Path, overrides: list) -> None:
    run, trained = export(tmp_path, *overrides)
    path = run / "encoder.safetensors"
    meta = read_metadata(path)
    assert meta["timm"]["loadable"] is True and "local-dir" in meta["timm"]["note"]
    config = json.loads((run / TIMM_CONFIG).read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, SIZE, SIZE]
    assert config["model_args"] == {"in_chans": 1, "num_classes": 0, **meta["model"]["backbone_kwargs"]}

    ours, _ = load_encoder(path)
    from_dir = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    from_file = overlay_line(path).eval()
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        want = trained(x)
        assert torch.equal(ours(x), want)
        assert torch.equal(from_dir(x), want) and torch.equal(from_file(x), want)
    for model in (ours, from_dir, from_file):
        assert data_config_of(model) == expected_data_config()

    # timm's own eval transform from that config is our evaluation transform (on a PIL image, as timm takes it)
    image = torch.randint(0, 256, (1, SIZE, SIZE), dtype=torch.uint8)
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=from_dir))
    ours_tf = eval_transform(SIZE, 1, MEAN, STD)
    pil = Image.fromarray(image[0].numpy(), mode="L")
    assert torch.allclose(timm_tf(pil), ours_tf(image), atol=1e-6)

    # fine-tuning as timm users do: a fresh head of the asked size on the same backbone
    with torch.no_grad():
        head = timm.create_model(f"local-dir:{run}", pretrained=True, num_classes=10).eval()
        assert head(x).shape == (3, 10)
        assert torch.equal(head.forward_head(head.forward_features(x), pre_logits=True), want)


@pytest.mark.parametrize("overrides, reason", [
    (["model.backbone=resnet10t", "model.small_stem=true"], "small_stem"),  # same weight shapes as timm's stem
    (["model.backbone=resnet18", "model.small_stem=true"], "small_stem"),  # 3x3 conv1: timm's is 7x7
    (["model.backbone=resnet10t", "model.small_stem=false", "model.stem_pool=false"], "stem_pool_false"),
], ids=["resnet10t-small-stem", "resnet18-small-stem", "resnet10t-no-stem-pool"])
def test_a_stem_timm_cannot_build_is_refused_by_timm_and_loads_with_load_encoder(
        tmp_path: Path, overrides: list, reason: str, caplog) -> None:
    run, trained = export(tmp_path, *overrides)
    path = run / "encoder.safetensors"
    meta = read_metadata(path)
    assert meta["timm"]["loadable"] is False and "use simclr_tau.models.export.load_encoder" in meta["timm"]["note"]
    assert not (run / TIMM_CONFIG).exists()
    with pytest.raises(FileNotFoundError, match=TIMM_CONFIG):
        timm.create_model(f"local-dir:{run}", pretrained=True)
    # the file alone, as documented (strict load): refused, the reason in the rejected key's name
    with pytest.raises(RuntimeError, match=NOT_TIMM_KEY.replace(".", r"\.") + reason):
        overlay_line(path)
    # without num_classes=0 in the overlay timm loads non-strictly: it says so, naming the same key
    m = meta["model"]
    with caplog.at_level(logging.WARNING):
        try:
            timm.create_model(m["backbone"], pretrained=True, num_classes=0, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
        except RuntimeError:  # resnet18's 7x7 stem against the 3x3 weights: refused for their shape
            assert m["backbone"] == "resnet18"
        else:
            assert NOT_TIMM_KEY + reason in caplog.text

    ours, _ = load_encoder(path)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(ours(x), trained(x))
    assert data_config_of(ours) == expected_data_config()


def test_a_re_export_that_timm_cannot_build_removes_the_stale_config(tmp_path: Path) -> None:
    run, _ = export(tmp_path, "model.backbone=resnet10t", "model.small_stem=false")
    assert (run / TIMM_CONFIG).is_file()
    cfg = load_config(None, ["model.backbone=resnet10t", "model.small_stem=true"])
    encoder, _ = build_encoder(cfg.model, 1)
    save_encoder(run / "encoder.safetensors", encoder, cfg.model, 1, SIZE, MEAN, STD)
    assert not (run / TIMM_CONFIG).exists()


def test_an_export_from_before_the_timm_key_still_loads(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run, trained = export(tmp_path, "model.backbone=resnet10t", "model.small_stem=true")
    path = run / "encoder.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "timm"}
    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith(NOT_TIMM_KEY)}
    save_file(weights, str(path), metadata=meta)
    loaded, read = load_encoder(path)
    assert read["timm"] is None
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_exporting_leaves_the_random_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    cfg = load_config(None, ["model.backbone=resnet10t", "model.small_stem=false"])
    encoder, _ = build_encoder(cfg.model, 1)
    torch.random.set_rng_state(before)
    save_encoder(tmp_path / "encoder.safetensors", encoder, cfg.model, 1, SIZE, MEAN, STD)
    assert torch.equal(torch.random.get_rng_state(), before)  # the check builds two models: on a forked RNG

"""What a new user types first (issue 19): config values YAML reads oddly, argument order, `simclr-tau config`,
`--version`, the names in `--help`. In-process and fast: nothing here trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_tau.config import load_config, load_distill_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")


# ---- train.mixed_precision=no (YAML 1.1 reads `no` as false) ---------------------------------------

@pytest.mark.parametrize("override, expected", [("no", "no"), ("No", "no"), ("false", "no"), ("off", "no"),
                                                ("bf16", "bf16"), ("fp16", "fp16")])
def test_mixed_precision_no_is_accepted_on_the_command_line(override: str, expected: str) -> None:
    cfg = load_config(TINY, [f"train.mixed_precision={override}"])
    assert cfg.train.mixed_precision == expected
    assert load_distill_config(TINY, ["teacher.path=x", f"train.mixed_precision={override}"]).train.mixed_precision == expected


@pytest.mark.parametrize("value", ["no", "false", "'no'"])
def test_mixed_precision_no_is_accepted_in_yaml(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  mixed_precision: {value}\n")
    assert load_config(path).train.mixed_precision == "no"


def test_mixed_precision_yes_is_still_an_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"train.mixed_precision='True' is not valid; accepted: no, bf16, fp16"):
        load_config(TINY, ["train.mixed_precision=yes"])


def test_the_accelerator_gets_the_string_no(monkeypatch) -> None:
    import accelerate

    from simclr_tau.train.session import start_accelerator

    seen = {}

    class FakeAccelerator:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    start_accelerator(load_config(TINY, ["train.mixed_precision=no"]).train)
    assert seen["mixed_precision"] == "no" and isinstance(seen["mixed_precision"], str)


# ---- the defaults resolved at run time -----------------------------------------------------------

@pytest.mark.parametrize("size", [16, 28, 32, 95, 96, 224])
def test_the_resolved_augmentation_is_the_one_the_pipelines_use(size: int) -> None:
    from simclr_tau.config import resolve_defaults
    from simclr_tau.data.augment import resolve_augment

    cfg = resolve_defaults(load_config(TINY, [f"data.image_size={size}"]))
    used = resolve_augment(load_config(TINY).augment, size)
    assert (cfg.augment.crop_scale_min, cfg.augment.blur_p) == (used["crop_scale_min"], used["blur_p"])


def test_the_native_image_size_is_the_datasets(tmp_path: Path) -> None:
    from simclr_tau.config.resolve import native_image_size
    from simclr_tau.data.datasets import build_pretrain_dataset

    cfg = load_config(TINY, ["data.synthetic_image_size=12"])
    assert native_image_size(cfg.data) == build_pretrain_dataset(cfg.data).image_size == 12
    (tmp_path / "a").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "x.png")
    folder = load_config(TINY, ["data.name=imagefolder", f"data.root={tmp_path}"]).data
    assert native_image_size(folder) == build_pretrain_dataset(folder).image_size

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


# ---- overrides before or after --resume ------------------------------------------------------------

@pytest.mark.parametrize("order", [["--resume", "auto", "train.epochs=2", "optim.lr=0.1"],
                                   ["train.epochs=2", "--resume", "auto", "optim.lr=0.1"],
                                   ["train.epochs=2", "optim.lr=0.1", "--resume", "auto"]], ids=["after", "between", "before"])
@pytest.mark.parametrize("command", ["pretrain", "distill"])
def test_overrides_may_come_before_or_after_resume(command: str, order: list, monkeypatch) -> None:
    """`simclr-tau pretrain CONFIG --resume auto a.b=v` loads the config with the override, as knn / linear do."""
    import simclr_tau.config as config_pkg
    from simclr_tau.cli import main

    seen = {}

    def stop(path, overrides, *a, **k):
        seen["overrides"] = list(overrides)
        raise SystemExit(0)

    monkeypatch.setattr(config_pkg, "load_config" if command == "pretrain" else "load_distill_config", stop)
    with pytest.raises(SystemExit) as exc:
        main([command, TINY, *order])
    assert exc.value.code == 0 and seen["overrides"] == ["train.epochs=2", "optim.lr=0.1"]


# ---- simclr-tau config -----------------------------------------------------------------------------

def _config_command(capsys, *argv: str) -> dict:
    import yaml

    from simclr_tau.cli import main

    main(["config", *argv])
    return yaml.safe_load(capsys.readouterr().out)


def test_config_prints_every_default_and_the_resolved_sizes(capsys) -> None:
    printed = _config_command(capsys, TINY, "train.epochs=3")
    assert printed["train"]["epochs"] == 3 and printed["train"]["mixed_precision"] == "no"
    assert printed["optim"]["momentum"] == 0.9 and printed["moco"]["queue_size"] == 4096  # defaults, not in the file
    assert printed["data"]["image_size"] == 16  # synthetic_image_size, not null
    assert (printed["augment"]["crop_scale_min"], printed["augment"]["blur_p"]) == (0.2, 0.0)  # < 96 px
    assert "teacher" not in printed


def test_config_resolves_large_images_and_conditional_tau_bounds(capsys) -> None:
    printed = _config_command(capsys, str(REPO / "configs" / "stl10_simclr.yaml"), "temperature.mode=conditional",
                              "temperature.init=0.2")
    assert printed["data"]["image_size"] == 96
    assert (printed["augment"]["crop_scale_min"], printed["augment"]["blur_p"]) == (0.08, 0.5)
    assert (printed["temperature"]["tau_min"], printed["temperature"]["tau_max"]) == (0.05, 1.0)
    learnable = _config_command(capsys, TINY, "temperature.mode=learnable")  # None = unbounded: stays None
    assert (learnable["temperature"]["tau_min"], learnable["temperature"]["tau_max"]) == (None, None)


def test_config_detects_a_distillation_config(capsys) -> None:
    seed = _config_command(capsys, str(REPO / "configs" / "distill_fmnist_seed.yaml"))
    assert seed["teacher"]["path"] == "runs/fmnist-teacher" and seed["teacher_temperature"]["init"] == 0.01
    assert seed["data"]["image_size"] == 28
    by_override = _config_command(capsys, TINY, "teacher.path=runs/t")  # the tests' way: a pretraining file
    assert by_override["teacher"]["path"] == "runs/t" and by_override["train"]["method"] == "seed"
    forced = _config_command(capsys, TINY, "--distill", "teacher.path=runs/t")
    assert forced == by_override


def test_the_printed_config_is_a_config_that_loads_to_the_same_run(tmp_path: Path, capsys) -> None:
    from simclr_tau.cli import main
    from simclr_tau.config import flatten, resolve_defaults

    main(["config", TINY, "train.epochs=3", "temperature.mode=conditional", "temperature.init=0.2"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(capsys.readouterr().out)
    again = load_config(saved)
    assert flatten(again) == flatten(resolve_defaults(load_config(TINY, ["train.epochs=3", "temperature.mode=conditional",
                                                                          "temperature.init=0.2"])))
    assert flatten(resolve_defaults(again)) == flatten(again)  # nothing left to resolve


def test_config_of_a_bad_file_is_a_one_line_error(capsys) -> None:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["config", "configs/nope.yaml"])
    assert exc.value.code == 2 and capsys.readouterr().err == "error: config file not found: configs/nope.yaml\n"


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


# ---- --version, --help names ----------------------------------------------------------------------------

def test_version_is_the_installed_packages(capsys, monkeypatch) -> None:
    from importlib import metadata

    import simclr_tau
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"simclr-tau {metadata.version('simclr-tau')}\n"

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["-V"])
    assert capsys.readouterr().out == f"simclr-tau {simclr_tau.__version__}\n"


@pytest.mark.parametrize("command", ["pretrain", "distill", "config"])
def test_help_names_the_command_it_was_reached_through(command: str, capsys) -> None:
    import importlib

    from simclr_tau.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: simclr-tau {command} ")
    module, func, _ = SUBCOMMANDS[command]
    if command != "config":  # launched as a module (accelerate launch -m simclr_tau.pretrain): the module's name
        with pytest.raises(SystemExit):
            getattr(importlib.import_module(module), func)(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {module} ")

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

"""Every shipped config validates against its schema (a typo in a shipped YAML would otherwise reach users)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_tau.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    if path.name.startswith("distill_"):
        from simclr_tau.config import load_distill_config

        cfg = load_distill_config(str(path))
    else:
        cfg = load_config(path)
    assert cfg.train.batch_size >= 1 and cfg.model.backbone


def test_all_configs_the_readme_names_exist() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = {p.stem for p in CONFIGS}
    import re

    for name in re.findall(r"configs/([a-z0-9_]+)\.yaml", readme):
        assert name in names, name

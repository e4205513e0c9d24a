"""The projection head's output BatchNorm (model.proj_out_bn)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simclr_tau.config import load_config
from simclr_tau.methods import build_method
from simclr_tau.models import mlp, out_bn_for

from procs import TINY


@pytest.mark.parametrize("out_bn,affine", [("plain", False), ("affine", True)])
def test_an_output_batchnorm_follows_a_bias_free_linear(out_bn: str, affine: bool) -> None:
    head = mlp(6, 8, 4, 2, out_bn)
    linear, bn = head[-2], head[-1]
    assert isinstance(linear, nn.Linear) and linear.bias is None
    assert isinstance(bn, nn.BatchNorm1d) and bn.affine is affine and bn.num_features == 4
    head.train()
    z = head(torch.randn(32, 6))
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)  # batch-normalized output
    if affine:
        with torch.no_grad():
            bn.weight.fill_(2.0)
            bn.bias.fill_(0.5)
        torch.testing.assert_close(head(torch.randn(32, 6)).mean(0), torch.full((4,), 0.5), atol=1e-5, rtol=0)


def test_none_ends_in_a_linear_with_bias_and_bn_false_drops_the_output_bn() -> None:
    head = mlp(6, 8, 4, 2, "none")
    assert isinstance(head[-1], nn.Linear) and head[-1].bias is not None
    bn_free = mlp(6, 8, 4, 2, "affine", bn=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in bn_free.modules())
    assert bn_free[-1].bias is not None
    with pytest.raises(ValueError, match="out_bn"):
        mlp(6, 8, 4, 2, "batch")


@pytest.mark.parametrize("choice,method,expected", [
    ("auto", "simclr", "none"), ("auto", "mocov2", "none"), ("auto", "mocov3", "plain"), ("auto", "seed", "none"),
    ("affine", "simclr", "affine"), ("none", "mocov3", "none"), ("plain", "simclr", "plain"),
])
def test_auto_keeps_each_methods_published_head(choice: str, method: str, expected: str) -> None:
    assert out_bn_for(load_config(TINY, [f"model.proj_out_bn={choice}"]).model, method) == expected


@pytest.mark.parametrize("method,last", [("simclr", nn.Linear), ("mocov3", nn.BatchNorm1d)])
def test_the_default_builds_the_heads_of_before(method: str, last: type) -> None:
    """proj_out_bn=auto: the same projector (module types, state-dict keys) as before the knob existed, so old
    checkpoints load: SimCLR's ends in a Linear with bias, MoCo v3's in a BatchNorm without affine."""
    cfg = load_config(TINY, [f"train.method={method}"])
    proj = build_method(cfg, 1, 10, 100).projector
    assert isinstance(proj[-1], last)
    keys = set(proj.state_dict())
    if method == "simclr":
        assert {"3.weight", "3.bias"} <= keys
    else:
        assert proj[-1].affine is False and "4.running_mean" in keys and "4.weight" not in keys


def test_the_config_switch_reaches_the_simclr_projector() -> None:
    proj = build_method(load_config(TINY, ["model.proj_out_bn=affine"]), 1, 10, 100).projector
    assert isinstance(proj[-1], nn.BatchNorm1d) and proj[-1].affine

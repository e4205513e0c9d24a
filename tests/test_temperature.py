"""τ modules: fixed, learnable (log / softplus / relu, bounds by projection), conditional (per sample);
gradcheck of the loss through each module's parameters; build_temperature and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from simclr_tau.config import TemperatureConfig, load_config
from simclr_tau.errors import UserError
from simclr_tau.losses import info_nce, nt_xent
from simclr_tau.temperature import (
    ConditionalTemperature,
    FixedTemperature,
    LearnableTemperature,
    ScheduledTemperature,
    build_temperature,
)

PARAMETRIZATIONS = ("log", "softplus", "relu")


def _pairs(n: int = 3, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return z1, z1 + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64)


# --- fixed -------------------------------------------------------------------------------------------


def test_fixed_temperature_is_a_constant_buffer():
    t = FixedTemperature(0.07)
    assert float(t().detach()) == pytest.approx(0.07, rel=1e-7)
    assert list(t.parameters()) == [] and "tau" in t.state_dict()
    assert t.stats(t()).keys() == {"tau"}
    with pytest.raises(ValueError, match=r"temperature.init=0.0 must be > 0"):
        FixedTemperature(0.0)


# --- learnable ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [0.01, 0.07, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_learnable_starts_at_init(parametrization, init):
    t = LearnableTemperature(init, parametrization)
    tau = t()
    assert tau.ndim == 0 and tau.requires_grad
    tau = tau.detach()
    # θ is a float32 parameter: g(θ) reproduces init to float32 precision (a few ulps), no more.
    assert float(tau) == pytest.approx(init, rel=1e-6, abs=0)
    assert [n for n, _ in t.named_parameters()] == ["theta"]


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_learnable_gradient_is_alive_inside_the_bounds(parametrization):
    t = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0)
    t().backward()
    theta = t.theta.detach()
    expected = {"log": theta.exp(), "softplus": torch.sigmoid(theta), "relu": torch.tensor(1.0)}[parametrization]
    assert float(t.theta.grad) != 0.0
    assert float(t.theta.grad) == pytest.approx(float(expected), rel=1e-6)  # dτ/dθ of the exact g


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_learnable_projection_clamps_to_the_bounds(parametrization):
    t = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0)
    t.project_()  # inside: untouched
    assert float(t().detach()) == pytest.approx(0.2, rel=1e-6)
    with torch.no_grad():
        t.theta.fill_(40.0)
    assert float(t().detach()) > 1.0
    t.project_()
    assert float(t().detach()) == pytest.approx(1.0, rel=1e-6)
    with torch.no_grad():
        t.theta.fill_(-40.0)
    assert float(t().detach()) < 0.05
    t.project_()
    assert float(t().detach()) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("direction", [1.0, -1.0])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_huge_optimizer_step_is_projected_back(parametrization, direction):
    t = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0)
    opt = torch.optim.SGD(t.parameters(), lr=1e4)
    (direction * t()).backward()  # +: push τ down, −: push τ up
    opt.step()
    moved = float(t().detach())
    assert moved != pytest.approx(0.2, rel=1e-3)
    t.project_()
    tau = float(t().detach())
    assert 0.05 * (1 - 1e-6) <= tau <= 1.0 * (1 + 1e-6)
    assert tau == pytest.approx(0.05 if direction > 0 else 1.0, rel=1e-6)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_only_relu_below_zero_reports_a_stuck_tau(parametrization):
    """relu's dead zone: θ ≤ 0 gives τ = ε and a zero gradient, so τ can never move again."""
    t = LearnableTemperature(0.2, parametrization)
    assert t.health() is None
    with torch.no_grad():
        t.theta.fill_(-0.5)
    tau = t()
    tau.backward()
    if parametrization == "relu":
        assert float(tau.detach()) == pytest.approx(1e-3) and float(t.theta.grad) == 0.0  # what the message claims
        msg = t.health()
        assert msg is not None and "stuck at its floor eps=0.001" in msg and "temperature.tau_min" in msg
    else:
        assert float(t.theta.grad) > 0.0 and t.health() is None  # log / softplus always have a gradient


def test_relu_with_tau_min_above_eps_never_reaches_the_dead_zone():
    t = LearnableTemperature(0.2, "relu", tau_min=0.01)
    with torch.no_grad():
        t.theta.fill_(-0.5)  # an optimizer step far below the bound
    t.project_()
    assert float(t().detach()) == pytest.approx(0.01) and t.health() is None


def test_learnable_without_bounds_is_not_projected():
    t = LearnableTemperature(0.2, "log")
    with torch.no_grad():
        t.theta.fill_(3.0)
    t.project_()
    assert float(t.theta.detach()) == 3.0


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_learnable_state_dict_round_trip(parametrization, tmp_path):
    t = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0)
    with torch.no_grad():
        t.theta.add_(0.123)
    torch.save(t.state_dict(), tmp_path / "tau.pt")
    fresh = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0)
    assert float(fresh().detach()) != float(t().detach())
    fresh.load_state_dict(torch.load(tmp_path / "tau.pt"))
    assert float(fresh.theta.detach()) == float(t.theta.detach()) and float(fresh().detach()) == float(t().detach())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": 0.0}, r"temperature.init=0.0 must be > 0"),
        ({"init": -0.1}, r"temperature.init=-0.1 must be > 0"),
        ({"init": 0.1, "parametrization": "exp"}, r"temperature.parametrization='exp'; accepted: log, softplus, relu"),
        ({"init": 0.1, "tau_min": 0.5, "tau_max": 0.5}, r"temperature.tau_min=0.5 must be < temperature.tau_max=0.5"),
        ({"init": 0.1, "tau_min": 0.2, "tau_max": 1.0}, r"temperature.init=0.1 lies outside \[tau_min, tau_max\]"),
        ({"init": 0.0005, "parametrization": "softplus"}, r"temperature.init=0.0005 must be > temperature.eps"),
    ],
)
def test_learnable_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnableTemperature(**kwargs)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gradcheck_loss_through_learnable_tau(parametrization):
    """d loss / d(z1, z2, θ) for τ = g(θ): the τ module and the loss together, in float64."""
    module = LearnableTemperature(0.2, parametrization, tau_min=0.05, tau_max=1.0).double()
    theta = module.theta.detach().clone().requires_grad_()
    z1, z2 = _pairs()
    queue = torch.randn(5, 4, dtype=torch.float64)

    def simclr(z1, z2, theta):
        return nt_xent(z1, z2, functional_call(module, {"theta": theta}, ()))

    def moco(q, theta):
        return info_nce(q, z2, queue, functional_call(module, {"theta": theta}, ()))

    assert simclr(z1, z2, theta).dtype == torch.float64
    assert gradcheck(simclr, (z1.requires_grad_(), z2.requires_grad_(), theta))
    assert gradcheck(moco, (z1, theta))


# --- conditional -------------------------------------------------------------------------------------


def _randomize_head(t: ConditionalTemperature, scale: float = 1.0, seed: int = 0) -> None:
    """Move away from the constant-τ initialization (the last layer starts at zero weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_conditional_starts_at_init_for_every_sample():
    t = ConditionalTemperature(in_dim=8, init=0.1, tau_min=0.05, tau_max=1.0, hidden_dim=16)
    tau = t(torch.randn(6, 8))
    assert tau.shape == (6,)
    torch.testing.assert_close(tau, torch.full((6,), 0.1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_conditional_shape_and_bounds(depth):
    t = ConditionalTemperature(in_dim=8, init=0.3, tau_min=0.05, tau_max=0.5, hidden_dim=16, depth=depth)
    _randomize_head(t, scale=0.3)
    tau = t(torch.randn(32, 8))
    assert tau.shape == (32,) and tau.dtype == torch.float32
    assert ((tau > 0.05) & (tau < 0.5)).all()
    assert tau.std() > 1e-3  # really per sample
    _randomize_head(t, scale=100.0)  # saturated sigmoid: the bounds still hold (closed interval)
    tau = t(torch.randn(32, 8))
    assert ((tau >= 0.05) & (tau <= 0.5)).all()


@pytest.mark.parametrize("detach_input", [True, False])
def test_conditional_detach_input(detach_input):
    t = ConditionalTemperature(in_dim=8, init=0.2, hidden_dim=16, detach_input=detach_input)
    _randomize_head(t)
    z = torch.randn(6, 8, requires_grad=True)
    t(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters())
    if detach_input:
        assert z.grad is None
    else:
        assert z.grad is not None and z.grad.abs().sum() > 0


def test_conditional_stats():
    t = ConditionalTemperature(in_dim=8, init=0.2, hidden_dim=16)
    _randomize_head(t)
    tau = t(torch.randn(10, 8))
    stats = t.stats(tau)
    assert stats.keys() == {"tau_mean", "tau_min", "tau_max", "tau_std"}
    values = tau.detach()
    assert float(stats["tau_mean"]) == pytest.approx(float(values.mean()), rel=1e-6)
    assert float(stats["tau_min"]) == float(values.min()) and float(stats["tau_max"]) == float(values.max())
    mean = values.double().mean()
    assert float(stats["tau_std"]) == pytest.approx(math.sqrt(float(((values.double() - mean) ** 2).mean())), rel=1e-5)
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_conditional_dtypes_and_autocast():
    t = ConditionalTemperature(in_dim=8, init=0.2, hidden_dim=16)
    _randomize_head(t, scale=0.3)
    z = torch.randn(4, 8)
    assert t(z.bfloat16()).dtype == torch.float32  # the head's precision, not the input's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tau = t(z)
    assert tau.dtype == torch.float32  # τ is not rounded to bf16 under mixed precision
    torch.testing.assert_close(tau, t(z), rtol=1e-6, atol=0)
    assert t.double()(z).dtype == torch.float64


def test_conditional_rejects_bad_input_and_arguments():
    t = ConditionalTemperature(in_dim=8)
    with pytest.raises(ValueError, match=r"embeddings of shape \(B, D\)"):
        t()
    with pytest.raises(ValueError, match=r"embeddings of shape \(B, D\)"):
        t(torch.randn(8))
    with pytest.raises(ValueError, match=r"0 < tau_min=0.5 < tau_max=0.5"):
        ConditionalTemperature(8, init=0.5, tau_min=0.5, tau_max=0.5)
    with pytest.raises(ValueError, match=r"temperature.init=0.01 must lie strictly inside"):
        ConditionalTemperature(8, init=0.01)


def test_gradcheck_loss_through_conditional_tau():
    """d nt_xent(z1, z2, τ(z)) / d(z, head parameters), with the τ head reading z (detach_input=False)."""
    t = ConditionalTemperature(in_dim=4, init=0.2, tau_min=0.05, tau_max=1.0, hidden_dim=3, detach_input=False).double()
    _randomize_head(t, seed=3)
    names = [n for n, _ in t.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in t.parameters()]
    z1, z2 = _pairs(3, 4, seed=4)

    def loss(z1, z2, *params):
        tau = functional_call(t, dict(zip(names, params)), (torch.cat([z1, z2]),))  # (2N,)
        return nt_xent(z1, z2, tau)

    assert gradcheck(loss, (z1.requires_grad_(), z2.requires_grad_(), *params))


# --- build_temperature and configuration errors -------------------------------------------------------


def test_build_temperature_modes():
    assert isinstance(build_temperature({"mode": "fixed", "init": 0.3}, 8), FixedTemperature)
    learnable = build_temperature(TemperatureConfig(mode="learnable", init=0.3, parametrization="softplus"), 8)
    assert isinstance(learnable, LearnableTemperature) and learnable.parametrization == "softplus"
    assert float(learnable().detach()) == pytest.approx(0.3, rel=1e-6)
    cond = build_temperature({"mode": "conditional", "init": 0.3, "tau_min": 0.1, "tau_max": 0.9, "hidden_dim": 4}, 8)
    assert isinstance(cond, ConditionalTemperature) and cond(torch.randn(5, 8)).shape == (5,)
    sched = build_temperature({"mode": "scheduled", "schedule": {"kind": "linear", "start": 0.5, "end": 0.1}}, 8, 10, 100)
    assert isinstance(sched, ScheduledTemperature) and float(sched()) == pytest.approx(0.5)
    cfg = load_config(None, ["temperature.mode=learnable", "temperature.init=0.05", "temperature.tau_max=0.5"])
    from_cfg = build_temperature(cfg.temperature, 8)
    assert isinstance(from_cfg, LearnableTemperature) and from_cfg.tau_max == 0.5


MODES = "fixed, learnable, conditional, scheduled"


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["temperature.init=0"], ["temperature.init=0.0", "must be > 0"]),
        (["temperature.init=-0.5"], ["temperature.init=-0.5", "must be > 0"]),
        (["temperature.tau_min=0.5", "temperature.tau_max=0.2"], ["temperature.tau_min=0.5", "must be < temperature.tau_max=0.2"]),
        (["temperature.tau_min=0.5", "temperature.tau_max=0.5"], ["temperature.tau_min=0.5", "temperature.tau_max=0.5"]),
        (["temperature.mode=bogus"], ["temperature.mode='bogus'", f"accepted: {MODES}"]),
        (["temperature.parametrization=exp"], ["temperature.parametrization='exp'", "accepted: log, softplus, relu"]),
        (
            ["temperature.mode=scheduled", "temperature.schedule.kind=zigzag"],
            ["temperature.schedule.kind='zigzag'", "accepted: constant, linear, cosine, exponential, step, plateau"],
        ),
        (["temperature.mode=conditional", "temperature.init=0.01"], ["temperature.init=0.01", "(0.05, 1.0)"]),
        (["temperature.mode=learnable", "temperature.init=0.1", "temperature.tau_min=0.2"], ["temperature.init=0.1", "tau_min"]),
    ],
)
def test_bad_config_names_field_and_accepted_values(overrides, fragments):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert isinstance(info.value, UserError)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "cfg, fragments",
    [
        ({"init": 0.0}, ["temperature.init=0.0", "must be > 0"]),
        ({"mode": "bogus"}, ["temperature.mode='bogus'", f"accepted: {MODES}"]),
        ({"mode": "learnable", "parametrization": "exp"}, ["temperature.parametrization='exp'", "accepted: log, softplus, relu"]),
        ({"mode": "learnable", "tau_min": 1.0, "tau_max": 0.1}, ["temperature.tau_min=1.0", "temperature.tau_max=0.1"]),
        (TemperatureConfig(mode="learnable", init=-1.0), ["temperature.init=-1.0", "must be > 0"]),
        (
            {"mode": "scheduled", "schedule": {"kind": "zigzag"}},
            ["temperature.schedule.kind='zigzag'", "accepted: constant, linear, cosine"],
        ),
    ],
)
def test_build_temperature_rejects_bad_config(cfg, fragments):
    with pytest.raises(UserError) as info:
        build_temperature(cfg, embed_dim=8)
    for fragment in fragments:
        assert fragment in str(info.value)

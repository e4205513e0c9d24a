"""τ schedules: every kind equals its closed form at chosen steps; plateau state machine; the scheduled τ
module and its checkpoint round trip (schedule state travels in the module's state_dict)."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_tau.config import ScheduleConfig, load_config
from simclr_tau.errors import UserError
from simclr_tau.temperature import Schedule, ScheduledTemperature, build_schedule, build_temperature

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 200  # 20 epochs


def schedule(**kwargs) -> Schedule:
    return Schedule(ScheduleConfig(**kwargs), STEPS_PER_EPOCH, TOTAL_STEPS)


STEPS = [0, 1, 5, 10, 37, 99, 100, 150, 199, 200, 250]


def test_constant():
    s = schedule(kind="constant", start=0.2, end=0.9)
    assert all(s(k) == 0.2 for k in STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_linear(step):
    s = schedule(kind="linear", start=0.5, end=0.1)
    e = step / STEPS_PER_EPOCH
    assert s(step) == pytest.approx(0.5 + (0.1 - 0.5) * min(e / 20.0, 1.0), rel=1e-12)


@pytest.mark.parametrize("period", [None, 4.0, 7.5])
@pytest.mark.parametrize("step", STEPS)
def test_cosine_kukleva(step, period):
    # Kukleva et al. 2023: τ(e) = τ_min + ½(τ_max − τ_min)(1 + cos(2π e / P)), start = τ_max, end = τ_min.
    tau_max, tau_min = 1.0, 0.1
    s = schedule(kind="cosine", start=tau_max, end=tau_min, period_epochs=period)
    P = period if period is not None else 2 * 20.0  # default: one monotone decay over the run
    e = step / STEPS_PER_EPOCH
    expected = tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(2 * math.pi * e / P))
    assert s(step) == pytest.approx(expected, rel=1e-12)


def test_cosine_landmarks():
    s = schedule(kind="cosine", start=1.0, end=0.1)  # P = 2 x 20 epochs
    assert s(0) == pytest.approx(1.0) and s(100) == pytest.approx(0.55) and s(200) == pytest.approx(0.1)
    values = [s(k) for k in range(201)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay start -> end
    periodic = schedule(kind="cosine", start=1.0, end=0.1, period_epochs=4.0)
    assert periodic(20) == pytest.approx(0.1) and periodic(40) == pytest.approx(1.0) and periodic(60) == pytest.approx(0.1)


@pytest.mark.parametrize("step", STEPS)
def test_exponential(step):
    s = schedule(kind="exponential", start=1.0, end=0.05, gamma=0.8)
    e = step / STEPS_PER_EPOCH
    assert s(step) == pytest.approx(max(0.05, 1.0 * 0.8**e), rel=1e-12)


def test_exponential_floor():
    s = schedule(kind="exponential", start=1.0, end=0.05, gamma=0.8)
    assert s(250) == 0.05  # 0.8^25 = 0.0038 < floor


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.0), (29, 1.0), (30, 0.5), (31, 0.5), (59, 0.5), (60, 0.25), (90, 0.125), (120, 0.1), (199, 0.1)],
)
def test_step(step, expected):
    s = schedule(kind="step", start=1.0, end=0.1, gamma=0.5, every_epochs=3)  # drop every 30 steps
    assert s(step) == pytest.approx(expected, rel=1e-12)


def test_step_fractional_period_boundary():
    # every_epochs = 0.3 with 10 steps per epoch: boundaries at steps 3, 6, 9 even though 0.6/0.3 is inexact.
    s = schedule(kind="step", start=1.0, end=0.01, gamma=0.5, every_epochs=0.3)
    assert [s(k) for k in (2, 3, 5, 6, 8, 9)] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25, 0.125])


@pytest.mark.parametrize("warmup_start", [None, 0.02])
@pytest.mark.parametrize("step", [0, 5, 10, 15, 19, 20, 21, 100])
def test_warmup_then_schedule(step, warmup_start):
    s = schedule(kind="linear", start=0.5, end=0.1, warmup_epochs=2.0, warmup_start=warmup_start)
    plain = schedule(kind="linear", start=0.5, end=0.1)
    e = step / STEPS_PER_EPOCH
    first = 0.5 if warmup_start is None else warmup_start
    if e < 2.0:
        expected = first + (plain(20) - first) * (e / 2.0)  # linear from warmup_start to v(warmup end)
    else:
        expected = plain(step)
    assert s(step) == pytest.approx(expected, rel=1e-12)


def test_warmup_is_continuous_at_its_end():
    s = schedule(kind="cosine", start=1.0, end=0.1, warmup_epochs=1.0, warmup_start=0.05)
    plain = schedule(kind="cosine", start=1.0, end=0.1)
    assert s(0) == pytest.approx(0.05)
    assert s(9) == pytest.approx(0.05 + (plain(10) - 0.05) * 0.9, rel=1e-12)
    assert s(10) == pytest.approx(plain(10), rel=1e-12) and s(11) == pytest.approx(plain(11), rel=1e-12)


def test_plateau_drops_after_patience_non_improving_observations():
    s = schedule(kind="plateau", start=0.8, end=0.15, gamma=0.5, patience=2, monitor_mode="max")
    assert s(0) == 0.8
    assert s.observe(0.50) is False  # first value: best
    assert s.observe(0.60) is False  # improvement
    assert s.observe(0.60) is False  # not better (1 of 2)
    assert s(123) == 0.8
    assert s.observe(0.55) is True  # 2 of 2: drop
    assert s(0) == s(123) == 0.4 and (s.drops, s.best, s.bad_evals) == (1, 0.60, 0)
    assert s.observe(0.70) is False  # improvement resets the count
    assert s.observe(0.10) is False and s.bad_evals == 1
    assert s.observe(0.70) is True and s(5) == 0.2  # equal is not better
    assert s.observe(0.0) is False and s.observe(0.0) is True
    assert s(5) == 0.15  # 0.8 x 0.5^3 = 0.1 would undershoot: floor at end
    assert s.observe(0.0) is False and s.observe(0.0) is True and s(5) == 0.15 and s.drops == 4


def test_plateau_min_mode():
    s = schedule(kind="plateau", start=1.0, end=0.1, gamma=0.5, patience=1, monitor_mode="min")
    assert s.observe(3.0) is False and s.observe(2.0) is False  # a loss going down is an improvement
    assert s.observe(2.5) is True and s(0) == 0.5


def test_observe_is_ignored_by_stateless_schedules():
    s = schedule(kind="exponential", start=1.0, end=0.05, gamma=0.8)
    before = [s(k) for k in STEPS]
    assert not any(s.observe(0.0) for _ in range(5))
    assert [s(k) for k in STEPS] == before


def test_scheduled_temperature_follows_its_schedule():
    t = ScheduledTemperature(schedule(kind="cosine", start=1.0, end=0.1))
    assert float(t()) == pytest.approx(1.0)
    assert list(t.parameters()) == []
    for k in (0, 57, 100, 200):
        t.step(k)
        tau = t()
        assert tau.ndim == 0 and not tau.requires_grad
        assert float(tau) == pytest.approx(t.schedule(k), rel=1e-6)
    assert t.stats(t()).keys() == {"tau"}


def test_scheduled_plateau_checkpoint_round_trip(tmp_path):
    def make() -> ScheduledTemperature:
        return ScheduledTemperature(schedule(kind="plateau", start=0.8, end=0.05, gamma=0.5, patience=2))

    t = make()
    for metric in (0.5, 0.6, 0.6, 0.55, 0.58):  # one drop, best 0.6, one bad evaluation pending
        t.observe(metric)
    t.step(42)
    assert (t.schedule.drops, t.schedule.best, t.schedule.bad_evals) == (1, 0.6, 1)
    torch.save({"temperature": t.state_dict()}, tmp_path / "ckpt.pt")

    fresh = make()
    assert float(fresh()) == pytest.approx(0.8)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt")["temperature"])  # weights_only load works
    assert fresh.schedule.state_dict() == t.schedule.state_dict() == {"drops": 1, "best": 0.6, "bad_evals": 1}
    assert float(fresh()) == float(t()) == pytest.approx(0.4)
    # The pending bad evaluation survived: one more non-improving observation drops both again.
    for module in (t, fresh):
        module.observe(0.1)
        assert module.schedule.drops == 2
        module.step(43)
    assert float(fresh()) == float(t()) == pytest.approx(0.2)


def test_build_schedule_from_dict_and_yaml_config():
    s = build_schedule({"kind": "step", "start": 1.0, "end": 0.1, "gamma": 0.5, "every_epochs": 2}, 10, 100)
    assert (s(0), s(25)) == (1.0, 0.5)
    cfg = load_config(None, ["temperature.mode=scheduled", "temperature.schedule.kind=exponential", "temperature.schedule.start=0.4"])
    t = build_temperature(cfg.temperature, embed_dim=8, steps_per_epoch=10, total_steps=100)
    t.step(20)
    assert float(t()) == pytest.approx(max(0.1, 0.4 * 0.5**2), rel=1e-6)


KINDS = "constant, linear, cosine, exponential, step, plateau"


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"kind": "zigzag"}, ["schedule.kind='zigzag'", f"accepted: {KINDS}"]),
        ({"kind": "cosine", "start": 0.1, "end": 0.5}, ["schedule", "cosine needs end", "< start"]),
        ({"kind": "step", "gamma": 1.5}, ["schedule.gamma=1.5", "must be in (0, 1)"]),
        ({"kind": "linear", "start": 0.0}, ["schedule.start=0.0", "must be > 0"]),
        ({"kind": "linear", "warmup_epochs": -1.0}, ["schedule.warmup_epochs=-1.0", "must be >= 0"]),
        ({"kind": "plateau", "monitor_mode": "up"}, ["schedule.monitor_mode='up'", "accepted: max, min"]),
    ],
)
def test_bad_schedule_config_names_field(kwargs, fragments):
    with pytest.raises(UserError) as info:
        build_schedule(kwargs, 10, 100)
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(ValueError) as info:  # same through the temperature config, with the full key
        build_temperature({"mode": "scheduled", "schedule": kwargs}, embed_dim=8, steps_per_epoch=10, total_steps=100)
    assert f"temperature.{fragments[0]}" in str(info.value)


def test_bad_step_counts_are_rejected():
    with pytest.raises(ValueError, match=r"steps_per_epoch=0 and total_steps=10 must be >= 1"):
        Schedule(ScheduleConfig(), 0, 10)

"""Temperature sampling over data sources: targets vs closed forms, realized frequencies within 3σ,
determinism, disjoint distributed shares (also across real processes), mid-epoch resume, scheduled T,
the concatenated dataset, the config surface, bad input."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from simclr_tau.config import AugmentConfig, Config, DataConfig, ScheduleConfig
from simclr_tau.data.datasets import make_synthetic
from simclr_tau.data.mixture import MixtureConfig, MixtureDataset, MixtureSampler, build_mixture, sampling_probabilities
from simclr_tau.errors import UserError
from simclr_tau.temperature.schedules import Schedule

REPO = Path(__file__).resolve().parents[1]
SCORES = [2.0, 3.0, 1.0]


def softmax_reference(scores: List[float], T: float) -> List[float]:
    e = [math.exp(w / T) for w in scores]
    return [v / sum(e) for v in e]


# ---- targets ------------------------------------------------------------------------------------

def test_score_targets_to_four_decimals() -> None:
    # softmax([2, 3, 1] / T). The figures [0.2419, 0.6577, 0.0890] (T = 1) and [0.3293, 0.3433, 0.3141]
    # (T = 10) sum to 0.9886 and 0.9867, so they cannot be the probabilities of 3 sources; the values of
    # P(i|T) = softmax(w/T)_i, the issue's own formula, are these:
    assert [round(p, 4) for p in sampling_probabilities(1.0, scores=SCORES).tolist()] == [0.2447, 0.6652, 0.0900]
    assert [round(p, 4) for p in sampling_probabilities(10.0, scores=SCORES).tolist()] == [0.3322, 0.3672, 0.3006]
    for T in (0.1, 0.5, 1.0, 2.0, 10.0, 1000.0):
        assert sampling_probabilities(T, scores=SCORES).tolist() == pytest.approx(softmax_reference(SCORES, T), rel=1e-12)
    # limits: T -> 0 picks the best score, T -> ∞ is uniform
    assert sampling_probabilities(1e-3, scores=SCORES).tolist() == pytest.approx([0, 1, 0], abs=1e-12)
    assert sampling_probabilities(1e6, scores=SCORES).tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 3.3, 10.0])
def test_size_targets_are_n_to_the_one_over_T(T: float) -> None:
    sizes = [60000, 5000, 50]
    raw = [n ** (1 / T) for n in sizes]
    expected = [r / sum(raw) for r in raw]
    assert sampling_probabilities(T, sizes=sizes).tolist() == pytest.approx(expected, rel=1e-12)
    # T = 1: proportional to size (every image equally likely); the sampler uses the same targets
    s = MixtureSampler(sizes, None, T)
    assert s.probabilities().tolist() == pytest.approx(expected, rel=1e-12)
    if T == 1.0:
        assert expected == pytest.approx([n / sum(sizes) for n in sizes], rel=1e-12)


# ---- realized frequencies -------------------------------------------------------------------

def _assert_within_3_sigma(counts: List[int], p: List[float]) -> None:
    n = sum(counts)
    for c, pi in zip(counts, p):
        sigma = math.sqrt(n * pi * (1 - pi))
        assert abs(c - n * pi) <= 3 * sigma + 1e-9, (counts, [n * q for q in p])


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 10.0])
def test_realized_frequencies_match_score_targets_within_3_sigma(T: float) -> None:
    sizes = [3000, 3000, 3000]
    sampler = MixtureSampler(sizes, SCORES, T, num_samples=10_000, seed=7)
    sampler.set_epoch(0)
    keys = list(sampler)
    assert len(keys) == 10_000 and all(e == 0 for e, _ in keys)
    counts = sampler.source_counts()
    # the logged counts are the truth: recount from the indices themselves
    truth = torch.bincount(torch.tensor([i for _, i in keys]) // 3000, minlength=3).tolist()
    assert counts == truth
    _assert_within_3_sigma(counts, softmax_reference(SCORES, T))


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 10.0])
def test_realized_frequencies_match_size_targets_within_3_sigma(T: float) -> None:
    sizes = [8000, 1000, 100]
    sampler = MixtureSampler(sizes, None, T, num_samples=10_000, seed=3)
    sampler.set_epoch(2)
    list(sampler)
    raw = [n ** (1 / T) for n in sizes]
    _assert_within_3_sigma(sampler.source_counts(), [r / sum(raw) for r in raw])


def test_each_source_is_drawn_without_replacement_until_exhausted() -> None:
    sizes = [5, 7, 50]
    sampler = MixtureSampler(sizes, [0.0, 0.0, 0.0], 1.0, num_samples=60, seed=1)
    sampler.set_epoch(0)
    idx = [i for _, i in sampler]
    offsets = [0, 5, 12]
    for s, (off, n) in enumerate(zip(offsets, sizes)):
        drawn = [i - off for i in idx if off <= i < off + n]
        for k in range(0, len(drawn), n):  # every full pass is a permutation of the source
            chunk = drawn[k:k + n]
            assert len(set(chunk)) == len(chunk) and all(0 <= j < n for j in chunk)
            if len(chunk) == n:
                assert sorted(chunk) == list(range(n))


# ---- determinism, shares, resume ------------------------------------------------------------

def _seq(sampler: MixtureSampler, epoch: int) -> List[int]:
    sampler.set_epoch(epoch)
    return [i for _, i in sampler]


def test_sequence_is_a_function_of_seed_and_epoch() -> None:
    make = lambda seed: MixtureSampler([100, 200, 50], SCORES, 2.0, num_samples=500, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    assert _seq(a, 3) == _seq(b, 3)
    assert _seq(a, 3) != _seq(a, 4)
    assert _seq(a, 3) != _seq(make(1), 3)
    assert _seq(a, 3) == _seq(make(0), 3)  # after other epochs too (no hidden state)


@pytest.mark.parametrize("block", [1, 4])
def test_two_ranks_draw_disjoint_shares_that_cover_the_epoch(block: int) -> None:
    sizes = [4000, 3000, 2000]  # large sources: no image repeats within the 1000 draws of the epoch
    kw = dict(num_samples=1000, seed=5, block=block)
    whole = _seq(MixtureSampler(sizes, SCORES, 1.0, **kw), 1)
    shares = [_seq(MixtureSampler(sizes, SCORES, 1.0, rank=r, world=2, **kw), 1) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 500
    assert len(MixtureSampler(sizes, SCORES, 1.0, rank=1, world=2, **kw)) == 500
    assert not set(shares[0]) & set(shares[1])  # disjoint indices
    assert sorted(shares[0] + shares[1]) == sorted(whole)  # together: the epoch
    assert len(set(whole)) == len(whole)
    # and the deal is the documented one: blocks of `block` draws, round-robin
    rebuilt = []
    for k in range(0, 500, block):
        rebuilt += shares[0][k:k + block] + shares[1][k:k + block]
    assert rebuilt == whole


def test_counts_of_all_ranks_equal_the_sum_of_the_ranks_counts() -> None:
    sizes, kw = [500, 500, 500], dict(num_samples=600, seed=2, block=3)
    ranks = [MixtureSampler(sizes, SCORES, 1.0, rank=r, world=2, **kw) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(0)
    per_rank = [s.source_counts(upto=120) for s in ranks]
    assert ranks[0].source_counts(upto=120, all_ranks=True) == [a + b for a, b in zip(*per_rank)]
    assert ranks[1].source_counts(upto=300, all_ranks=True) == MixtureSampler(sizes, SCORES, 1.0, **{**kw, "block": 1}).source_counts(upto=600)


@pytest.mark.parametrize("world", [1, 2])
def test_resuming_mid_epoch_reproduces_the_rest_of_the_sequence(world: int) -> None:
    sizes = [300, 200, 100]
    for rank in range(world):
        full = MixtureSampler(sizes, SCORES, 2.0, num_samples=400, seed=9, rank=rank, world=world)
        seq = _seq(full, 6)
        resumed = MixtureSampler(sizes, SCORES, 2.0, num_samples=400, seed=9, rank=rank, world=world)  # a new process
        resumed.set_epoch(6, start=37)
        rest = [i for _, i in resumed]
        assert rest == seq[37:]
        # the realized counts continue where the interrupted run stopped
        assert resumed.source_counts() == full.source_counts()


def test_two_real_processes_draw_disjoint_shares(tmp_path: Path) -> None:
    """Each process builds its sampler from torch.distributed's rank / world (gloo) and iterates its share."""
    from procs import free_port, run_proc

    script = tmp_path / "share.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        "from simclr_tau.distributed import rank_and_world\n"
        "from simclr_tau.data.mixture import MixtureSampler\n"
        "dist.init_process_group('gloo')\n"
        "rank, world = rank_and_world()\n"
        "s = MixtureSampler([4000, 3000, 2000], [2.0, 3.0, 1.0], 1.0, num_samples=1000, seed=5, rank=rank, world=world)\n"
        "s.set_epoch(1)\n"
        "json.dump([i for _, i in s], open(sys.argv[1] + f'/rank{rank}.json', 'w'))\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = run_proc([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), str(script), str(tmp_path)], env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = _seq(MixtureSampler([4000, 3000, 2000], SCORES, 1.0, num_samples=1000, seed=5), 1)
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(whole)


# ---- scheduled temperature --------------------------------------------------------------------

def test_scheduled_T_is_evaluated_at_each_draws_step_and_realized() -> None:
    # 20 steps of 1000 draws per epoch, T linear 10 -> 0.2 over 2 epochs: broad -> focused
    spe, bs = 20, 1000
    sched = Schedule(ScheduleConfig(kind="linear", start=10.0, end=0.2), spe, 2 * spe)
    sampler = MixtureSampler([50000] * 3, SCORES, sched, num_samples=spe * bs, batch_size=bs, seed=0)
    for step in (0, 7, 25, 39):
        assert sampler.T(step) == pytest.approx(sched(step))
        assert sampler.probabilities(step).tolist() == pytest.approx(softmax_reference(SCORES, sched(step)), rel=1e-12)
    sampler.set_epoch(1)  # steps 20..39
    src = torch.tensor([i // 50000 for _, i in sampler])
    for s in (20, 39):  # one optimizer step's draws follow that step's T
        counts = torch.bincount(src[(s - 20) * bs:(s - 19) * bs], minlength=3).tolist()
        _assert_within_3_sigma(counts, softmax_reference(SCORES, sched(s)))
    metrics = sampler.log_metrics(upto=bs * 20, step=39)
    assert metrics["data/sampling_T"] == pytest.approx(sched(39))
    assert sum(v for k, v in metrics.items() if k.startswith("data/freq_")) == pytest.approx(1.0)
    assert metrics["data/p_source1"] == pytest.approx(softmax_reference(SCORES, sched(39))[1])


# ---- dataset, builder, config ------------------------------------------------------------------

def test_mixture_dataset_concatenates_sources_with_distinct_classes() -> None:
    a, b = make_synthetic(10, 2, 8, seed=0), make_synthetic(6, 3, 8, seed=1)
    ds = MixtureDataset([a, b], ["a", "b"])
    assert len(ds) == 16 and ds.sizes == [10, 6] and ds.offsets == [0, 10]
    assert torch.equal(ds.images[10:], b.images) and torch.equal(ds.labels[10:], b.labels + 2)
    assert ds.classes == ["a/class0", "a/class1", "b/class0", "b/class1", "b/class2"]
    assert ds.source_of(9) == 0 and ds.source_of(10) == 1
    with pytest.raises(UserError, match=r"data.sources\[1\] \(b\) has 3 channels.*data.channels=rgb"):
        MixtureDataset([a, make_synthetic(4, 2, 8, channels=3)], ["a", "b"])
    with pytest.raises(UserError, match=r"data.sources\[1\].*mix datasets of one size"):
        MixtureDataset([a, make_synthetic(4, 2, 12)], ["a", "b"])


@dataclass
class _DataWithSources(DataConfig):
    """What DataConfig gains on integration (see the report): data.sources + data.mixture."""

    sources: List[Dict[str, Any]] = field(default_factory=list)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)


@dataclass
class _Cfg(Config):
    data: _DataWithSources = field(default_factory=_DataWithSources)


def test_example_config_builds_a_mixture_that_feeds_the_pretraining_loader() -> None:
    from simclr_tau.config import load_config
    from simclr_tau.data.batch_augment import BatchAugment
    from simclr_tau.data.datasets import normalization
    from simclr_tau.train.loaders import BatchedLoader

    cfg = load_config(REPO / "configs" / "mixture_example.yaml", schema=_Cfg)
    assert [s["score"] for s in cfg.data.sources] == [2.0, 0.0]
    # tiny stand-ins for the example's sources (same 28 px, 1 channel)
    cfg.data.sources[0] = {"name": "synthetic", "synthetic_size": 40, "synthetic_image_size": 28, "score": 2.0}
    cfg.data.sources[1].synthetic_size = 24
    cfg.data.mixture.num_samples = 64
    ds, sampler = build_mixture(cfg.data, cfg.data.sources, cfg.data.mixture, seed=0, batch_size=16, epochs=4)
    assert len(ds) == 64 and sampler.names == ["synthetic", "synthetic_1"]
    sched = cfg.data.mixture.schedule
    assert sampler.T(0) == pytest.approx(sched.start)  # a scheduled T over the run: 4 epochs x 4 steps
    assert sampler.T(8) == pytest.approx((sched.start + sched.end) / 2) and sampler.T(16) == pytest.approx(sched.end)
    _, short = build_mixture(cfg.data, cfg.data.sources, cfg.data.mixture, seed=0, batch_size=16, epochs=4, max_steps=8)
    assert short.T(8) == pytest.approx(sched.end)  # train.max_steps shortens the schedule like the run
    norm = normalization("mixture", ds)
    aug = BatchAugment(AugmentConfig(enabled=False), ds.image_size, ds.channels, norm.mean, norm.std)
    loader = BatchedLoader(ds.images, aug, sampler, 16, 1, 0, 0, torch.device("cpu"))
    batches = list(loader.epoch(0, skip_steps=0, accum=1))
    assert len(batches) == 4 and batches[0][0][0].shape == (16, 1, 28, 28)


def test_bad_input_gives_one_line_user_errors() -> None:
    with pytest.raises(UserError, match="3 scores for 2 sources; give one score per source"):
        MixtureSampler([10, 20], SCORES, 1.0)
    for T in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match=r"mixture temperature T=.* must be > 0"):
            MixtureSampler([10, 20], [1.0, 2.0], T)
        with pytest.raises(UserError, match="must be > 0"):
            sampling_probabilities(T, scores=[1.0, 2.0])
    bad_T = MixtureSampler([10, 20], [1.0, 2.0], lambda step: 1.0 - step)
    with pytest.raises(UserError, match=r"T\(step=1\)=0.0 must be > 0"):
        bad_T.probabilities(1)
    with pytest.raises(UserError, match="at least one image"):
        MixtureSampler([10, 0], None, 1.0)
    base = DataConfig(name="synthetic", synthetic_size=16)
    with pytest.raises(UserError, match=r"data.sources\[1\] needs a score"):
        build_mixture(base, [{"name": "synthetic", "score": 1.0}, {"name": "synthetic"}], {}, seed=0, batch_size=4)
    with pytest.raises(UserError, match=r"data.sources\[0\].*synthetic_sise"):
        build_mixture(base, [{"name": "synthetic", "synthetic_sise": 3, "score": 1.0}], {}, seed=0, batch_size=4)
    with pytest.raises(UserError, match="data.mixture.temperature=0.0 must be > 0"):
        build_mixture(base, [{"name": "synthetic", "score": 1.0}], {"temperature": 0.0}, seed=0, batch_size=4)
    with pytest.raises(UserError, match="data.mixture.schedule.start"):
        build_mixture(base, [{"name": "synthetic", "score": 1.0}], {"schedule": {"kind": "linear", "start": -1.0, "end": 1.0}},
                      seed=0, batch_size=4)
    with pytest.raises(UserError, match="data.mixture.weighting='sizes' is not valid"):
        build_mixture(base, [{"name": "synthetic"}], {"weighting": "sizes"}, seed=0, batch_size=4)

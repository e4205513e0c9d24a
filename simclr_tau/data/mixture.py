"""Pretraining on a mixture of datasets, with a temperature over the sources.

Each draw first picks a source i, then the next image of that source:

- score-based:  P(i | T) = softmax(w / T)_i for user scores w (T → 0: the best-scored source only;
  T → ∞: uniform over sources);
- size-based:   p_i ∝ n_i^(1/T) for source sizes n_i (Lample & Conneau 2019, XLM, α = 1/T = 0.5;
  Xue et al. 2021, mT5, α = 0.3): T = 1 samples every image equally often, T → ∞ every source equally.

T is a constant or a :class:`~simclr_tau.temperature.schedules.Schedule` evaluated at the optimizer
step of each draw (anneal from broad to focused: T high → low on scores).

Within a source, images are taken in a fresh seeded permutation per pass, so a source repeats an image
only after all of its images were drawn in this epoch (without replacement, cycling).

:class:`MixtureSampler` has :class:`~simclr_tau.data.pipeline.EpochSampler`'s interface (``set_epoch``,
iterate ``(epoch, index)`` keys, ``len``), so the training loop's loaders take it unchanged. The whole
epoch is a pure function of ``(seed, epoch)``: every process can regenerate it, which gives

- distributed use without communication: with ``rank``/``world``, a process iterates its own share,
  blocks of ``block`` consecutive draws dealt round-robin (``block = 1``: draws r, r + W, r + 2W, ...;
  ``block`` = per-process micro-batch: the slicing of the pretraining loaders), disjoint across ranks
  and covering the epoch;
- mid-epoch resume: ``set_epoch(epoch, start=n)`` skips this process's first n draws;
- realized frequencies: :meth:`MixtureSampler.source_counts` counts the draws made so far.

Example:
    >>> s = MixtureSampler([100, 50, 10], scores=[2.0, 3.0, 1.0], temperature=1.0, num_samples=8, seed=0)
    >>> [round(p, 4) for p in s.probabilities(0).tolist()]
    [0.2447, 0.6652, 0.09]
    >>> s.set_epoch(0); keys = list(s); len(keys), keys[0][0]
    (8, 0)
"""

from __future__ import annotations

import math
from dataclasses import is_dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Sampler

from simclr_tau.config import MixtureConfig
from simclr_tau.data.datasets import ImageDataset, TensorImageDataset
from simclr_tau.data.pipeline import mix_seed
from simclr_tau.errors import UserError

WEIGHTINGS = ("scores", "size")
TemperatureLike = Union[float, Callable[[int], float]]  # a constant T, or T(step) (a Schedule)


def _check_T(T: float, what: str = "mixture temperature T") -> float:
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise UserError(f"{what}={T} must be > 0 (a finite number)")
    return float(T)


def sampling_probabilities(T: float, scores: Optional[Sequence[float]] = None,
                           sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Target source probabilities (float64): softmax(scores / T), or sizes^(1/T) normalized.

    Example:
        >>> [round(p, 4) for p in sampling_probabilities(10.0, scores=[2.0, 3.0, 1.0]).tolist()]
        [0.3322, 0.3672, 0.3006]
        >>> [round(p, 4) for p in sampling_probabilities(2.0, sizes=[100, 25]).tolist()]  # sqrt(100) : sqrt(25)
        [0.6667, 0.3333]
    """
    T = _check_T(T)
    if (scores is None) == (sizes is None):
        raise ValueError("give exactly one of scores or sizes")
    if scores is not None:
        w = torch.as_tensor(list(scores), dtype=torch.float64)
        return torch.softmax(w / T, dim=0)
    n = torch.as_tensor(list(sizes), dtype=torch.float64)  # type: ignore[arg-type]
    logits = n.log() / T  # n^(1/T) in log space: no overflow for large n and small T
    return torch.softmax(logits, dim=0)


class MixtureSampler(Sampler[Tuple[int, int]]):
    """Temperature sampling over sources; yields ``(epoch, global index)`` keys of a :class:`MixtureDataset`.

    Args:
        sizes: number of images of each source (global index = source offset + index in the source).
        scores: one score w_i per source (score-based); None = size-based p_i ∝ n_i^(1/T).
        temperature: T > 0, or a callable ``step -> T`` (e.g. a :class:`~simclr_tau.temperature.Schedule`).
        names: source names for :meth:`log_metrics` (default ``source0``, ``source1``, ...).
        num_samples: draws per epoch (all processes together); default ``sum(sizes)``.
        batch_size: draws per optimizer step (the global batch): draw p of epoch e is at step
            ``e · (num_samples // batch_size) + p // batch_size``, where a scheduled T is evaluated.
        seed, rank, world, block: see the module docstring. ``rank = 0, world = 1`` (default) iterates the
            whole epoch, as the pretraining loaders expect (they slice each global micro-batch per rank).
    """

    def __init__(self, sizes: Sequence[int], scores: Optional[Sequence[float]] = None,
                 temperature: TemperatureLike = 1.0, *, names: Optional[Sequence[str]] = None,
                 num_samples: Optional[int] = None, batch_size: int = 1, seed: int = 0,
                 rank: int = 0, world: int = 1, block: int = 1) -> None:
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise UserError(f"mixture: every source needs at least one image; sizes={self.sizes}")
        if scores is not None:
            scores = [float(w) for w in scores]
            if len(scores) != len(self.sizes):
                raise UserError(f"mixture: {len(scores)} scores for {len(self.sizes)} sources; give one score per source")
            if not all(math.isfinite(w) for w in scores):
                raise UserError(f"mixture: scores must be finite numbers; got {scores}")
        self.scores = scores
        if not callable(temperature):
            _check_T(temperature)
        self.temperature = temperature
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(self.sizes))]
        if len(self.names) != len(self.sizes):
            raise UserError(f"mixture: {len(self.names)} names for {len(self.sizes)} sources")
        self.num_samples = int(num_samples) if num_samples is not None else sum(self.sizes)
        if self.num_samples < 1 or batch_size < 1 or block < 1:
            raise UserError(f"mixture: num_samples={self.num_samples}, batch_size={batch_size} and block={block} must be >= 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} must lie in [0, world={world})")
        self.batch_size, self.seed, self.rank, self.world, self.block = batch_size, seed, rank, world, block
        self.steps_per_epoch = max(self.num_samples // batch_size, 1)
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.epoch, self.start, self.consumed = 0, 0, 0
        self._cache: Optional[Tuple[int, Tensor, Tensor]] = None  # (epoch, sources, indices) of the whole epoch

    # ---- targets ---------------------------------------------------------------------------------
    def T(self, step: int) -> float:
        """The sampling temperature at optimizer ``step``."""
        if callable(self.temperature):
            return _check_T(float(self.temperature(step)), f"mixture temperature T(step={step})")
        return float(self.temperature)

    def probabilities(self, step: int = 0) -> Tensor:
        """Target probabilities of the sources at optimizer ``step`` (float64, sums to 1)."""
        T = self.T(step)
        if self.scores is not None:
            return sampling_probabilities(T, scores=self.scores)
        return sampling_probabilities(T, sizes=self.sizes)

    # ---- the epoch's draws -----------------------------------------------------------------------
    def _draws(self, epoch: int) -> Tuple[Tensor, Tensor]:
        """(source (N,), global index (N,)) of every draw of ``epoch``, all processes together."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        N, S = self.num_samples, len(self.sizes)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        # Step of each draw -> its CDF row; one row per distinct step (a constant T: one row).
        step0 = epoch * self.steps_per_epoch
        local = torch.clamp(torch.arange(N) // self.batch_size, max=self.steps_per_epoch - 1)
        steps = torch.unique(local)
        cdf = torch.stack([self.probabilities(step0 + int(s)).cumsum(0) for s in steps])  # steps x S
        row = torch.searchsorted(steps, local)
        u = torch.rand(N, generator=g, dtype=torch.float64)
        # inverse CDF: the first source whose cumulative probability exceeds u
        source = (u[:, None] >= cdf[row]).sum(1).clamp_(max=S - 1)  # N
        index = torch.empty(N, dtype=torch.long)
        for i in range(S):
            where = torch.nonzero(source == i).flatten()
            if where.numel() == 0:
                continue
            passes = -(-where.numel() // self.sizes[i])  # a fresh permutation per pass over the source
            perms = [torch.randperm(self.sizes[i], generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1 + i * 100003 + k)))
                     for k in range(passes)]
            index[where] = self.offsets[i] + torch.cat(perms)[: where.numel()]
        self._cache = (epoch, source, index)
        return source, index

    def _share(self, n_total: int) -> Tensor:
        """Positions (in the epoch's draw sequence) of this rank's share, in order."""
        pos = torch.arange(n_total)
        return pos[(pos // self.block) % self.world == self.rank]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``; the next iteration skips this process's first ``start`` draws (mid-epoch resume)."""
        self.epoch, self.start, self.consumed = int(epoch), int(start), int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        _, index = self._draws(self.epoch)
        epoch = self.epoch
        for i in index[self._share(self.num_samples)[self.start:]].tolist():
            self.consumed += 1
            yield epoch, i

    def __len__(self) -> int:
        """Draws of this process in one epoch."""
        return len(self._share(self.num_samples))

    # ---- realized frequencies ------------------------------------------------------------------
    def source_counts(self, upto: Optional[int] = None, all_ranks: bool = False) -> List[int]:
        """Draws per source among this process's first ``upto`` draws of the epoch (default: the draws
        iterated so far). ``all_ranks``: over every process's first ``upto`` draws (processes advance in
        lockstep in training; the sequence is deterministic, so no communication is needed)."""
        source, _ = self._draws(self.epoch)
        n = self.consumed if upto is None else int(upto)
        if all_ranks:
            pos = torch.arange(self.num_samples)
            draw_of_rank = (pos // (self.block * self.world)) * self.block + pos % self.block  # k-th draw of its rank
            chosen = source[draw_of_rank < n]
        else:
            chosen = source[self._share(self.num_samples)[:n]]
        return torch.bincount(chosen, minlength=len(self.sizes)).tolist()

    def log_metrics(self, upto: Optional[int] = None, step: Optional[int] = None, all_ranks: bool = True) -> Dict[str, float]:
        """``data/freq_<name>`` (realized frequency so far), ``data/p_<name>`` (target at ``step``), ``data/sampling_T``."""
        counts = self.source_counts(upto, all_ranks)
        total = max(sum(counts), 1)
        step = self.epoch * self.steps_per_epoch if step is None else step
        p = self.probabilities(step).tolist()
        out: Dict[str, float] = {"data/sampling_T": self.T(step)}
        for name, c, pi in zip(self.names, counts, p):
            out[f"data/freq_{name}"] = c / total
            out[f"data/p_{name}"] = pi
        return out


class MixtureDataset(TensorImageDataset):
    """In-memory sources concatenated: images (N, C, H, W), labels offset per source (classes stay distinct).

    Attributes beyond :class:`~simclr_tau.data.datasets.TensorImageDataset`: ``names``, ``sizes``, ``offsets``.
    """

    def __init__(self, sources: Sequence[ImageDataset], names: Sequence[str]) -> None:
        if not sources:
            raise UserError("data.sources is empty: list at least one dataset")
        first = sources[0]
        for i, (ds, name) in enumerate(zip(sources, names)):
            if ds.images is None:
                raise UserError(f"data.sources[{i}] ({name}) is not an in-memory dataset; mixtures take "
                                "fashion_mnist, cifar10, cifar100, stl10 or synthetic")
            if ds.channels != first.channels:
                raise UserError(f"data.sources[{i}] ({name}) has {ds.channels} channels but data.sources[0] has "
                                f"{first.channels}; set data.channels=rgb to mix grayscale and color datasets")
            if tuple(ds.images.shape[-2:]) != tuple(first.images.shape[-2:]):  # type: ignore[union-attr]
                raise UserError(f"data.sources[{i}] ({name}) holds {tuple(ds.images.shape[-2:])} images but "
                                f"data.sources[0] holds {tuple(first.images.shape[-2:])}; mix datasets of one size")  # type: ignore[union-attr]
        labels, classes, offset = [], [], 0
        for ds, name in zip(sources, names):
            labels.append(ds.labels + offset)
            classes += [f"{name}/{c}" for c in ds.classes]
            offset += ds.num_classes
        super().__init__(torch.cat([ds.images for ds in sources]), torch.cat(labels), classes)  # type: ignore[misc]
        self.names = list(names)
        self.sizes = [len(ds) for ds in sources]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def source_of(self, index: int) -> int:
        """The source a global index belongs to."""
        for i in reversed(range(len(self.offsets))):
            if index >= self.offsets[i]:
                return i
        raise IndexError(index)


def _plain(x: Any) -> Dict[str, Any]:
    """A plain dict of a dict, a dataclass instance or an OmegaConf node."""
    from omegaconf import OmegaConf

    if isinstance(x, dict):
        return dict(x)
    if is_dataclass(x):
        x = OmegaConf.structured(x)
    return OmegaConf.to_container(x, resolve=True)  # type: ignore[return-value]


def _source_names(sources: Sequence[Any]) -> List[str]:
    names, seen = [], {}
    for src in sources:
        base = str(src.get("name", "synthetic"))
        k = seen.get(base, 0)
        seen[base] = k + 1
        names.append(base if k == 0 else f"{base}_{k}")
    return names


def build_mixture(data_cfg: Any, sources: Sequence[Any], mixture: Any, *, seed: int, batch_size: int,
                  epochs: int = 1, max_steps: Optional[int] = None) -> Tuple[MixtureDataset, MixtureSampler]:
    """Build the dataset and the (global-sequence) sampler of a mixture.

    ``sources``: a list of dicts, each a set of ``DataConfig`` overrides of ``data_cfg`` plus ``score`` (w_i),
    e.g. ``[{"name": "fashion_mnist", "root": "...", "score": 2.0}, {"name": "synthetic", "score": 1.0}]``.
    ``mixture``: a :class:`MixtureConfig` (or dict). The schedule of a scheduled T spans the run's
    ``min(epochs x steps per epoch, max_steps)`` steps, steps per epoch = draws per epoch // ``batch_size``
    (``train.epochs``, ``train.max_steps``, ``train.batch_size``: the pretraining loop's own step count). Errors are :class:`UserError` naming ``data.sources[i]`` / ``data.mixture``.
    """
    from omegaconf import OmegaConf

    from simclr_tau.config import DataConfig, merge_into
    from simclr_tau.data.datasets import build_pretrain_dataset
    from simclr_tau.temperature.schedules import Schedule

    mix = merge_into(OmegaConf.structured(MixtureConfig), "data.mixture", mixture)
    if mix.weighting not in WEIGHTINGS:
        raise UserError(f"data.mixture.weighting={mix.weighting!r} is not valid; accepted: {', '.join(WEIGHTINGS)}")
    base = _plain(data_cfg)
    # every source inherits the parent's settings (channels, image_size, ...) except its own name/subset/classes
    base = {k: v for k, v in base.items() if k in DataConfig.__dataclass_fields__ and k not in ("name", "subset", "classes")}
    sources = [_plain(s) for s in sources]
    datasets, scores = [], []
    for i, src in enumerate(sources):
        src = dict(src)
        score = src.pop("score", None)
        if mix.weighting == "scores":
            if score is None:
                raise UserError(f"data.sources[{i}] needs a score (data.mixture.weighting=scores)")
            scores.append(float(score))
        cfg_i = merge_into(OmegaConf.merge(OmegaConf.structured(DataConfig), base), f"data.sources[{i}]", src)
        if cfg_i.name in ("imagefolder", "mixture"):
            raise UserError(f"data.sources[{i}].name={cfg_i.name!r}: mixtures take in-memory datasets only")
        datasets.append(build_pretrain_dataset(cfg_i))
    names = _source_names(sources)
    dataset = MixtureDataset(datasets, names)
    if batch_size > (mix.num_samples or len(dataset)):
        raise UserError(f"train.batch_size={batch_size} is larger than the draws per epoch ({mix.num_samples or len(dataset)})")
    T: TemperatureLike = _check_T(mix.temperature, "data.mixture.temperature")
    if mix.schedule is not None:
        spe = max((mix.num_samples or len(dataset)) // batch_size, 1)
        total = min(spe * epochs, max_steps) if max_steps is not None else spe * epochs
        T = Schedule(mix.schedule, spe, total, "data.mixture.schedule")
    sampler = MixtureSampler(dataset.sizes, scores if mix.weighting == "scores" else None, T, names=names,
                             num_samples=mix.num_samples, batch_size=batch_size, seed=seed)
    return dataset, sampler

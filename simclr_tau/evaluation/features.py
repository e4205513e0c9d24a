"""Frozen-encoder features: batched, ``no_grad``, eval mode, float32, optionally distributed and cached.

``extract_features(encoder, dataset, transform)`` runs ``encoder(transform(image))`` over a dataset of
``(uint8 C x H x W, label)`` and returns ``(features (N, F) float32 CPU, labels (N,) long)`` in dataset
order. With an ``accelerate.Accelerator`` every process encodes its shard of the batches and
``gather_for_metrics`` reassembles them (dropping the duplicates that pad the last batch), so every
process returns the same full tensors.

``cached_features(...)`` adds a disk cache: ``<cache_dir>/<split>-<key>.pt`` (``torch.save`` of two
tensors, read back with ``torch.load(weights_only=True)``), where ``key`` hashes the encoder's identity
(the content hash of its ``encoder.safetensors``, or a given checkpoint id), the dataset (name, root,
split, size and a fingerprint of its images and labels) and the transform's parameters. A second
evaluation of the same encoder on the same data reuses the features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simclr_tau.fileio import atomic_write

CACHE_VERSION = 1  # bump when the feature computation changes meaning


class PixelEncoder(nn.Module):
    """The raw-pixel baseline: the 'features' of an image are its flattened (normalized) pixels."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)  # B x (C*H*W)


# ---- loading batches --------------------------------------------------------------------------------

# v2 transforms that are deterministic and work on a whole (B, C, H, W) batch at once.
_BATCHABLE = {"Compose", "ToImage", "ToDtype", "Resize", "CenterCrop", "Normalize", "ToPureTensor", "Identity"}


def is_batchable(transform: Callable) -> bool:
    """True for a deterministic torchvision v2 pipeline (e.g. ``eval_transform``) that may be applied to
    a whole batch; random transforms must run per sample (one draw per image)."""
    names = {type(transform).__name__}
    for t in getattr(transform, "transforms", []):
        names.add(type(t).__name__)
    return names <= _BATCHABLE


class _PerSample(Dataset):
    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        image, label = self.dataset[i]
        return self.transform(image), label


class _BatchCollate:
    """collate_fn over indices of an in-memory dataset: one batched transform call per batch."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __call__(self, indices: list) -> Tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.transform(self.images[idx]), self.labels[idx]


def make_loader(dataset: Any, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential loader of ``(transform(images), labels)`` batches in dataset order."""
    images = getattr(dataset, "images", None)
    if images is not None and is_batchable(transform):
        return DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=_BatchCollate(images, dataset.labels, transform))
    return DataLoader(_PerSample(dataset, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)


# ---- extraction -------------------------------------------------------------------------------------

def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Any, transform: Callable, batch_size: int = 256, accelerator: Any = None,
    num_workers: int = 0, progress: bool = False, desc: str = "features",
) -> Tuple[Tensor, Tensor]:
    """``(features (N, F) float32 CPU, labels (N,) long CPU)`` of ``encoder`` over ``dataset``.

    The encoder runs in eval mode under ``no_grad``; its previous train/eval mode is restored afterwards
    (the training loop calls this for online kNN). With ``accelerator``, batches are sharded over the
    processes and gathered with ``gather_for_metrics``; the encoder must already sit on
    ``accelerator.device`` (an unwrapped module, not a DDP wrapper, is fine: no gradients flow).
    """
    from tqdm.auto import tqdm

    loader = make_loader(dataset, transform, batch_size, num_workers)
    is_main = True
    if accelerator is not None:
        from accelerate.data_loader import prepare_data_loader

        loader = prepare_data_loader(loader, accelerator.device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=True)
        is_main = accelerator.is_main_process
        device = accelerator.device
    else:
        device = _module_device(encoder)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        # disable=None: a bar on a terminal only, no carriage-return frames in a log file
        bar = tqdm(loader, desc=desc, disable=None if (progress and is_main) else True, leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
            f = encoder(x).float()  # B x F
            if f.ndim != 2:
                raise ValueError(f"the encoder must return (B, F) features; got shape {tuple(f.shape)}")
            if accelerator is not None:
                f, y = accelerator.gather_for_metrics((f.contiguous(), y.contiguous()))
            feats.append(f.cpu())
            labels.append(y.cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features: the dataset is empty")
    return torch.cat(feats), torch.cat(labels).long()


# ---- cache ------------------------------------------------------------------------------------------

def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content (the identity of an exported encoder)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes, values): the identity of in-memory weights."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def dataset_identity(dataset: Any, name: str, root: str, split: str) -> Dict[str, Any]:
    """What identifies a dataset for the cache: name, root, split, size, shape and a content fingerprint
    (SHA-1 of the in-memory images and labels; labels only for on-disk datasets)."""
    h = hashlib.sha1()
    images = getattr(dataset, "images", None)
    if images is not None:
        h.update(images.contiguous().numpy().tobytes())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(labels.long().contiguous().numpy().tobytes())
    return {
        "name": name,
        "root": str(Path(root).resolve()) if name not in ("synthetic",) else "",
        "split": split,
        "size": len(dataset),
        "channels": getattr(dataset, "channels", None),
        "fingerprint": h.hexdigest(),
    }


def cache_key(encoder_id: str, dataset_id: Mapping[str, Any], transform_id: Mapping[str, Any]) -> str:
    """Hash of (encoder identity, dataset identity, transform parameters)."""
    blob = json.dumps({"v": CACHE_VERSION, "encoder": encoder_id, "dataset": dict(dataset_id),
                       "transform": dict(transform_id)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cached_features(
    encoder: nn.Module, dataset: Any, transform: Callable, *, cache_dir: Optional[str | Path], encoder_id: str,
    dataset_id: Mapping[str, Any], transform_id: Mapping[str, Any], batch_size: int = 256, accelerator: Any = None,
    num_workers: int = 0, progress: bool = False,
) -> Tuple[Tensor, Tensor, bool]:
    """:func:`extract_features` through the disk cache. Returns ``(features, labels, cache_hit)``.

    ``cache_dir=None`` disables the cache. Only the main process writes (atomically); every process reads.
    An unreadable cache file is recomputed and overwritten.
    """
    path = None
    if cache_dir is not None:
        key = cache_key(encoder_id, dataset_id, transform_id)
        path = Path(cache_dir) / f"{dataset_id.get('split', 'data')}-{key}.pt"
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                feats, labels = blob["features"], blob["labels"]
                if feats.shape[0] == labels.shape[0] == len(dataset):
                    return feats, labels, True
            except Exception:  # truncated / foreign file: recompute below
                pass
    feats, labels = extract_features(encoder, dataset, transform, batch_size, accelerator, num_workers,
                                     progress, desc=str(dataset_id.get("split", "features")))
    if path is not None and (accelerator is None or accelerator.is_main_process):
        _atomic_torch_save({"features": feats, "labels": labels}, path)
    return feats, labels, False

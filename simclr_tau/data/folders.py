"""ImageFolder trees: decoded per sample (:class:`FolderImageDataset`) or, for small images, as one in-memory
uint8 tensor decoded once and cached on disk (:func:`load_folder`).

A tree of small images trained through DataLoader workers decodes every file twice per epoch (43 images/s
measured with 1,400 PNGs of 32 px and one thread); the same images as one uint8 tensor take the batched
on-device augmentation of in-memory datasets. :func:`load_folder` decides, per tree and split:

- **cached** when the decoded tensor ``N x C x S x S`` bytes (S = ``data.image_size``, default the
  imagefolder native 224) is at most ``data.folder_cache_mb`` (default 1024 MiB: the data then costs less
  memory than the model and optimizer of a ResNet-50 at batch 256, and a 60k-image 28 px tree takes
  141 MiB at 3 channels); ``data.folder_cache_mb=0`` turns the cache off. Every image is decoded,
  resized so its short side is S and center-cropped to S x S (the evaluation transform's geometry), and
  stored in ``<data.cache_dir>/<key>.pt`` (``torch.save`` of plain tensors, read back with
  ``weights_only=True``: a cache file is data, never code).
- **per sample** (:class:`~simclr_tau.data.datasets.FolderImageDataset`) otherwise, and always with
  ``data.pipeline=dataloader``.

The key hashes the tree's root, its class list and every file's relative path, size and mtime (ns), with S,
the channel count and the format version: adding, removing, replacing or touching a file makes a new cache;
a stale one is simply never read again (delete ``data.cache_dir`` to reclaim the space).

Views differ from the per-sample path in one way: the random crop is taken from the S x S image, not from
the original file, so images much larger than S lose detail before the crop. The threshold keeps the cache
for trees whose images are small anyway; set ``data.folder_cache_mb=0`` for the exact per-sample recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from simclr_tau.config.resolve import NATIVE_IMAGE_SIZE
from simclr_tau.data.images import ImageDataset, TensorImageDataset
from simclr_tau.errors import UserError
from simclr_tau.fileio import atomic_write

FORMAT = 1  # bump when the cached content changes for the same key


class CorruptImageError(UserError):
    """An image file that cannot be decoded.

    A DataLoader worker's exception is re-raised in the main process as ``type(e)(message + worker
    traceback)``; the message is cut back to its one line here, so the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class FolderImageDataset(ImageDataset):
    """An ImageFolder tree (``root/<class>/<image>``) decoded to uint8 RGB tensors on access.

    A file that cannot be decoded (corrupt, truncated, empty, not an image) stops the run with a one-line
    :class:`CorruptImageError` naming the file, when it is first read. It is not skipped: skipping would
    change the fixed global batch (and with it the loss and the exact resume), and replacing it with
    another sample would silently train on a different dataset. Remove or re-encode the file and
    ``--resume auto`` (the checkpoint of the interrupted run is kept).
    """

    def __init__(self, root: Path, channels: int = 3) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root), loader=lambda p: p)  # decode lazily in __getitem__
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"data.root={root}: not an ImageFolder tree (root/<class>/<image>): {e}") from None
        self.labels = torch.tensor(self.folder.targets, dtype=torch.long)
        self.classes = list(self.folder.classes)
        self.channels = channels
        self.image_size = NATIVE_IMAGE_SIZE["imagefolder"]  # images differ in size: their views are resized to it

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image

        path, label = self.folder.samples[i]
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        try:
            return decode_image(path, mode=mode), label
        except (RuntimeError, OSError) as e:
            # torchvision: "decode_jpeg, <source file>:171, Image is incomplete or truncated"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cause = re.sub(r"^[^,]*, \S+:\d+, ", "", first)[:200]  # drop torchvision's source location
            raise CorruptImageError(f"{path}: cannot decode image ({cause}); remove or re-encode the file, "
                                    "then --resume auto") from None



def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/simclr_tau/folders`` (``~/.cache/simclr_tau/folders``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simclr_tau" / "folders"


def cache_bytes(n: int, channels: int, size: int) -> int:
    """Bytes of the decoded uint8 tensor N x C x S x S."""
    return n * channels * size * size


def tree_key(folder: FolderImageDataset, root: Path, size: int) -> str:
    """Hash of the tree's file list (relative path, size, mtime ns), classes, S, channels and FORMAT."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT, "root": str(root.resolve()), "size": size, "channels": folder.channels,
                         "classes": folder.classes}, sort_keys=True).encode())
    for path, label in folder.folder.samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _square(img: Tensor, size: int) -> Tensor:
    """uint8 (C, H, W) -> uint8 (C, S, S): short side resized to S (bilinear, antialiased), center crop."""
    from torchvision.transforms.v2 import functional as TF

    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])
    return img


def decode_all(folder: FolderImageDataset, size: int, progress: bool = True) -> Tensor:
    """Every image of ``folder`` as one uint8 tensor (N, C, S, S), decoded by a thread pool (torchvision's
    decoders release the GIL), with a progress bar on long trees."""
    n = len(folder)
    out = torch.empty((n, folder.channels, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = _square(folder[i][0], size)

    bar = None
    if progress and n >= 2000:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"decoding {n} images into the folder cache", unit="img", mininterval=2.0, disable=None)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(one, range(n), chunksize=64):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def load_folder(root: Path, cfg: Any, progress: bool = True) -> ImageDataset:
    """The imagefolder tree at ``root`` for a DataConfig ``cfg``: cached in memory when it fits (module doc),
    else decoded per sample."""
    folder = FolderImageDataset(root)
    if len(folder) == 0:
        raise UserError(f"data.root={root}: no images found")
    size = int(cfg.image_size or folder.image_size)
    limit_mb = float(cfg.folder_cache_mb)  # in [0, 2**24] (config/ranges.py)
    if cfg.pipeline == "dataloader" or limit_mb <= 0:
        return folder
    if cache_bytes(len(folder), folder.channels, size) > limit_mb * 2**20:
        return folder
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    path = cache_dir / f"{tree_key(folder, root, size)}.pt"
    images = _read(path, len(folder), folder.channels, size)
    if images is None:
        images = decode_all(folder, size, progress)
        try:
            atomic_write(path, lambda tmp: torch.save({"images": images}, tmp))
        except OSError as e:
            print(f"folder cache: could not write {path} ({e.strerror or e}); continuing without it", flush=True)
    return TensorImageDataset(images, folder.labels, folder.classes)  # its image_size: S, from the tensor


def _read(path: Path, n: int, channels: int, size: int) -> Optional[Tensor]:
    """The cached tensor at ``path`` if it is readable and has the expected shape and dtype, else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images = blob["images"]
    except Exception:  # noqa: BLE001 - a truncated or foreign file is a cache miss, rebuilt and replaced
        return None
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != (n, channels, size, size):
        return None
    return images

"""ImageFolder trees of small images: decoded once into a uint8 tensor cache and trained batched
(simclr_tau.data.folders), against the per-sample decode as the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from simclr_tau.config import load_config
from simclr_tau.data.augment import eval_transform
from simclr_tau.data.datasets import build_eval_datasets, build_pretrain_dataset
from simclr_tau.data.folders import FolderImageDataset, cache_bytes, load_folder
from simclr_tau.data.images import TensorImageDataset
from simclr_tau.errors import UserError


def make_tree(root: Path, n_per_class: int = 6, sizes=((20, 20), (24, 18), (16, 22))) -> Path:
    """Two classes of random RGB PNGs of mixed sizes (not square, not S) under root/<class>/."""
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            w, h = sizes[i % len(sizes)]
            arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def data_cfg(root: Path, cache: Path, *extra: str):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                              f"data.cache_dir={cache}", *extra]).data


def test_a_small_tree_is_cached_as_the_eval_geometry_of_every_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    ds = load_folder(root, data_cfg(root, tmp_path / "cache"))
    assert isinstance(ds, TensorImageDataset) and ds.images.shape == (12, 3, 16, 16) and ds.image_size == 16
    ref = FolderImageDataset(root)
    assert ds.classes == ref.classes and torch.equal(ds.labels, ref.labels)
    to_unit = eval_transform(16, 3, [0.0] * 3, [1.0] * 3)  # resize short side + center crop, in [0, 1]
    for i in range(len(ref)):
        want = to_unit(ref[i][0])
        got = ds.images[i].float() / 255
        # the cache resizes in uint8, the eval transform in float: they differ by the rounding only
        assert (got - want).abs().max().item() <= 1.01 / 255, i
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_the_second_load_reads_the_cache_and_a_changed_tree_gets_a_new_one(tmp_path: Path, monkeypatch) -> None:
    import simclr_tau.data.folders as folders

    root = make_tree(tmp_path / "tree")
    cfg = data_cfg(root, tmp_path / "cache")
    first = load_folder(root, cfg)
    decodes = []
    real = folders.decode_all
    monkeypatch.setattr(folders, "decode_all", lambda *a, **k: decodes.append(1) or real(*a, **k))
    again = load_folder(root, cfg)
    assert decodes == [] and torch.equal(again.images, first.images)
    # touch one file (same bytes, new mtime): a new key, decoded again, the same images
    path = root / "cat" / "0.png"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = load_folder(root, cfg)
    assert decodes == [1] and torch.equal(touched.images, first.images)
    # replace a file's content: the cache follows it
    Image.fromarray(torch.zeros(20, 20, 3, dtype=torch.uint8).numpy()).save(path)
    replaced = load_folder(root, cfg)
    assert decodes == [1, 1] and replaced.images[0].sum().item() == 0 and first.images[0].sum().item() > 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    cfg = data_cfg(root, tmp_path / "cache")
    first = load_folder(root, cfg)
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    assert torch.equal(load_folder(root, cfg).images, first.images)
    torch.save({"images": torch.zeros(3, 3, 16, 16, dtype=torch.uint8)}, cache_file)  # wrong shape
    assert torch.equal(load_folder(root, cfg).images, first.images)


def test_large_trees_and_the_dataloader_pipeline_stay_per_sample(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    need_mb = cache_bytes(12, 3, 16) / 2**20
    assert isinstance(load_folder(root, data_cfg(root, tmp_path / "c", f"data.folder_cache_mb={need_mb}")),
                      TensorImageDataset)
    for extra in (f"data.folder_cache_mb={need_mb * 0.99}", "data.folder_cache_mb=0", "data.pipeline=dataloader"):
        assert type(load_folder(root, data_cfg(root, tmp_path / "c", extra))) is FolderImageDataset, extra
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1  # only the first (fitting) load wrote one
    with pytest.raises(UserError, match=r"data.folder_cache_mb=-1.0 must lie in \[0, 16777216\]"):
        data_cfg(root, tmp_path / "c", "data.folder_cache_mb=-1")


def test_a_corrupt_image_stops_the_cache_build_naming_the_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"bad.png: cannot decode image") as e:
        load_folder(root, data_cfg(root, tmp_path / "cache"))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_pretraining_on_a_cached_tree_takes_the_batched_pipeline(tmp_path: Path) -> None:
    from simclr_tau.train.loaders import BatchedLoader, build_loader
    from simclr_tau.data.pipeline import EpochSampler

    root = make_tree(tmp_path / "tree")
    cfg = load_config("configs/synthetic_tiny.yaml", ["data.name=imagefolder", f"data.root={root}",
                                                      "data.image_size=16", f"data.cache_dir={tmp_path / 'cache'}"])
    ds = build_pretrain_dataset(cfg.data)
    train, test = build_eval_datasets(cfg.data)
    assert ds.images is not None and torch.equal(train.images, ds.images)
    loader = build_loader(cfg, ds, 16, [0.5] * 3, [0.25] * 3, EpochSampler(len(ds), 0), 4, 1, 0,
                          torch.device("cpu"))
    assert isinstance(loader, BatchedLoader)

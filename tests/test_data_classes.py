"""``data.classes``: train and evaluate on a subset of the classes (relabelled 0..K-1), its one-line errors,
and a per-sample dro τ table sized to the images kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config, to_yaml
from simclr_tau.data.datasets import build_eval_datasets, build_pretrain_dataset, keep_classes, make_synthetic
from simclr_tau.data.images import ImageDataset, TensorImageDataset
from simclr_tau.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
SIX = ["data.synthetic_classes=6", "data.synthetic_size=96"]


def test_every_split_keeps_the_listed_classes_relabelled_in_ascending_order():
    cfg = load_config(TINY, [*SIX, "data.classes=[5,1,3,4]"])
    full = make_synthetic(96, 6, 16, seed=0)
    train, test = build_eval_datasets(cfg.data)
    pretrain = build_pretrain_dataset(cfg.data)
    assert train.classes == test.classes == pretrain.classes == ["class1", "class3", "class4", "class5"]
    assert train.num_classes == 4
    kept = torch.isin(full.labels, torch.tensor([1, 3, 4, 5]))
    assert torch.equal(pretrain.images, full.images[kept]) and len(pretrain) == 64
    old_to_new = {1: 0, 3: 1, 4: 2, 5: 3}
    assert pretrain.labels.tolist() == [old_to_new[int(y)] for y in full.labels[kept]]
    assert set(test.labels.tolist()) == {0, 1, 2, 3} and len(test) == 16  # 24 test images, 4 of each class


def test_subset_takes_the_first_images_kept_and_the_order_given_does_not_matter():
    a = build_pretrain_dataset(load_config(TINY, [*SIX, "data.classes=[0,2]", "data.subset=10"]).data)
    b = build_pretrain_dataset(load_config(TINY, [*SIX, "data.classes=[2,0]"]).data)
    assert len(a) == 10 and torch.equal(a.images, b.images[:10]) and torch.equal(a.labels, b.labels[:10])
    assert set(b.labels.tolist()) == {0, 1}


def test_resolved_config_round_trips_the_classes(tmp_path):
    cfg = load_config(TINY, [*SIX, "data.classes=[0,1,2,3]"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert list(load_config(tmp_path / "c.yaml").data.classes) == [0, 1, 2, 3]
    assert load_config(TINY).data.classes is None


@pytest.mark.parametrize("override, message", [
    ("data.classes=[1]", "at least 2 classes"),
    ("data.classes=[]", "at least 2 classes"),
    ("data.classes=[1,1,2]", "more than once"),
    ("data.classes=[0,6]", "[6] lies outside the class indices 0..5"),
    ("data.classes=[-1,2]", "[-1] lies outside"),
])
def test_bad_classes_are_one_line_errors(override, message):
    with pytest.raises(UserError) as e:
        load_config(TINY, [*SIX, override])
    assert message in str(e.value) and "data.classes" in str(e.value) and "\n" not in str(e.value)


def test_known_datasets_are_range_checked_at_load_and_others_at_build():
    with pytest.raises(UserError, match=r"\[10\] lies outside the class indices 0..9"):
        load_config(None, ["data.name=fashion_mnist", "data.classes=[0,10]"])
    load_config(None, ["data.name=cifar100", "data.classes=[0,99]"])
    ds = make_synthetic(12, 3, 8)
    with pytest.raises(UserError, match="outside the class indices 0..2"):
        keep_classes(ds, [0, 3])  # an imagefolder tree's class count is known only once it is read


def test_mixture_takes_classes_per_source_only():
    with pytest.raises(UserError, match=r"data.sources\[i\].classes"):
        load_config(None, ["data.name=mixture", "data.sources=[{name: synthetic, score: 1.0}]", "data.classes=[0,1]"])


def test_on_disk_dataset_is_refused():
    class OnDisk(ImageDataset):
        labels = torch.tensor([0, 1, 2])
        classes = ["a", "b", "c"]

    with pytest.raises(UserError, match="in-memory datasets"):
        keep_classes(OnDisk(), [0, 1])


def test_unlabelled_images_are_dropped():
    ds = TensorImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([-1, 0, 1, 2]), ["a", "b", "c"])
    kept = keep_classes(ds, [1, 2])
    assert kept.labels.tolist() == [0, 1] and kept.classes == ["b", "c"]


def test_per_sample_dro_table_is_sized_to_the_images_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
    from simclr_tau.train.pretrain import run

    cfg = load_config(TINY, [*SIX, "data.classes=[0,1,2,3]", f"train.output_dir={tmp_path}", "train.run_name=dro",
                             "temperature.mode=dro", "temperature.dro.per_sample=true", "train.max_steps=2"])
    result = run(cfg)
    state = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])["model"]
    assert state["temperature.tau"].shape == (64,)  # 96 images, 4 of 6 classes kept
    saved = load_config(result.run_dir / "config.yaml")
    assert list(saved.data.classes) == [0, 1, 2, 3]

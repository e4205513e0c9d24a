"""lightly's own SimCLR recipe on our data, for side-by-side benchmarks (bench_train.py, bench_tta.py).

``SimCLRTransform`` on PIL images in DataLoader workers, ``SimCLRProjectionHead`` and ``NTXentLoss``, with the
config's timm backbone, batch, τ, SGD settings and augmentation parameters, in a plain PyTorch loop: what a
user of lightly would write. Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LightlySimCLR:
    loader: Any  # yields (x1, x2) two-view batches of cfg.train.batch_size
    model: torch.nn.Module  # backbone + projection head; model[0] is the encoder
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    autocast: Any
    device: torch.device
    steps_per_epoch: int


def build_lightly_simclr(cfg: Any) -> LightlySimCLR:
    """lightly's SimCLR for a loaded config (see the module docstring)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from simclr_tau.data.augment import resolve_augment
    from simclr_tau.data.datasets import build_pretrain_dataset, normalization
    from simclr_tau.models import build_encoder
    from simclr_tau.train.optim import scaled_lr

    ds = build_pretrain_dataset(cfg.data)
    norm = normalization(cfg.data.name, ds)
    size = cfg.data.image_size or ds.image_size
    a = resolve_augment(cfg.augment, size)
    transform = SimCLRTransform(
        input_size=size, cj_prob=a["jitter_p"], cj_strength=a["brightness"] / 0.8, cj_bright=0.8, cj_contrast=0.8,
        cj_sat=0.8, cj_hue=0.2, min_scale=a["crop_scale_min"], random_gray_scale=a["grayscale_p"],
        gaussian_blur=a["blur_p"], hf_prob=a["flip_p"], vf_prob=0.0, rr_prob=0.0,
        normalize={"mean": norm.mean, "std": norm.std},
    )

    class PilDataset(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            x = ds.images[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
            return transform(img)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(PilDataset(), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        pin_memory=device.type == "cuda")
    backbone, dim = build_encoder(cfg.model, ds.channels)
    head = SimCLRProjectionHead(dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim)
    model = torch.nn.Sequential(backbone, head).to(device)
    amp = cfg.train.mixed_precision  # the same autocast as ours: the comparison is about the recipe and data path
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "no")
    optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(cfg.optim, cfg.train.batch_size), momentum=0.9,
                                weight_decay=cfg.optim.weight_decay)
    return LightlySimCLR(loader, model, NTXentLoss(temperature=cfg.temperature.init), optimizer, autocast, device,
                         len(ds) // cfg.train.batch_size)


def train_step(r: LightlySimCLR, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    x1, x2 = x1.to(r.device, non_blocking=True), x2.to(r.device, non_blocking=True)
    with r.autocast:
        loss = r.loss_fn(r.model(x1), r.model(x2))
    loss.backward()
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return loss

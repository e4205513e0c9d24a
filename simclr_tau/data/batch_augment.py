"""The SimCLR recipe of :mod:`simclr_tau.data.augment`, vectorized over a batch on its device.

Same parameter distributions and the same function of the parameters as the torchvision pipeline
(:func:`simclr_tau.data.augment.simclr_view_transform`), without a Python loop over images
(as in KellerJordan/cifar10-airbench):

- crop + resize + flip: one ``F.grid_sample`` (bilinear) over a per-sample sampling grid. Crop boxes
  are drawn exactly as ``RandomResizedCrop.get_params`` does (10 tries in parallel, first valid one,
  then the central fallback) and sampling coordinates are clamped to the box, so the result equals
  torchvision's crop-then-resize when the crop is upsampled (crop side <= S, always the case when the
  input is S x S). A flip reverses the sampling grid's x coordinates: free, and exactly ``flip(-1)``.
  Crops larger than S are resampled without antialiasing (torchvision antialiases): resize the data
  to about S beforehand in that case.
- color jitter: per-sample factors; brightness ``f x``, contrast ``c x + (1 - c) mean(gray(x))``,
  saturation ``s x + (1 - s) gray(x)``, each clamped to [0, 1], hue a shift of H in HSV space
  (torchvision's formulas). The four ops run in an independent random order per sample, as in
  torchvision: the three blend ops before the hue shift run in "pre" slots, those after it in "post"
  slots, and every slot is one fused blend with per-sample coefficients (identity where a sample has
  nothing in that slot), so the costly RGB -> HSV -> RGB round trip runs once per batch, not four times.
- grayscale, blur, solarize: computed for the whole batch, kept per sample with ``torch.where``;
  the blur is a separable Gaussian with one kernel per sample (grouped convolution, reflect padding).

All random numbers come from ``torch.rand(..., generator=generator, device=x.device)``: a seeded
generator gives the same views. ``forward(x) = apply(x, sample_params(...))``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from simclr_tau.data.augment import BLUR_SIGMA, CROP_RATIO, SOLARIZE_THRESHOLD, check_stats, resolve_augment

# color-jitter op ids (torchvision's ColorJitter fn_idx convention); NONE marks an empty slot
BRIGHTNESS, CONTRAST, SATURATION, HUE, NONE = 0, 1, 2, 3, 4
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> luma (B, 1, H, W); (B, 1, H, W) is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Add ``shift`` (B,) to the HSV hue (in turns) of RGB ``x`` (B, 3, H, W) in [0, 1].

    torchvision's RGB -> HSV -> RGB round trip without materializing S and V: a hue shift keeps
    max = V and chroma = max - min = V S, and HSV -> RGB is, for channel n in (R, G, B),
    max - chroma clamp(min(k, 4 - k), 0, 1) with k = (m_n + 6 H) mod 6, m = (5, 3, 1).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: much faster than a max over dim 1 on CPU
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # 6 H in [0, 6): piecewise by the channel holding the max (Pillow's formulas). |num| <= chroma, so the
    # clamp only touches gray pixels (num = chroma = 0: H = 0, as torchvision), which the chroma factor cancels
    is_r, is_g = maxc == r, maxc == g
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    h6 = num / chroma.clamp_min(1e-12) + torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h6 = (h6 + 6.0 * shift.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W); the mod 6 comes below
    m = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (m + h6).remainder(6.0)  # (B, 3, H, W)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _per_sample(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


class BatchAugment(nn.Module):
    """SimCLR views of a uint8 batch (B, C, H, W) -> float32 (B, C, S, S), normalized, on x's device.

    Args:
        cfg: an ``AugmentConfig`` or DictConfig (see :func:`simclr_tau.data.augment.resolve_augment`).
        image_size: output side S.
        channels: C, 1 or 3 (on one channel saturation, hue and grayscale are skipped).
        mean, std: per-channel normalization.

    Example:
        >>> from simclr_tau.config import AugmentConfig
        >>> aug = BatchAugment(AugmentConfig(), 28, 1, [0.286], [0.353])
        >>> x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
        >>> g = torch.Generator().manual_seed(0)
        >>> v1, v2 = aug(x, g), aug(x, g)  # two independent views
        >>> v1.shape, v1.dtype, bool((v1 != v2).any())
        (torch.Size([8, 1, 28, 28]), torch.float32, True)
    """

    def __init__(self, cfg: Any, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        check_stats(channels, mean, std)
        self.params = resolve_augment(cfg, image_size)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, channels={self.channels}, " + ", ".join(f"{k}={v}" for k, v in self.params.items())

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One random view per image of ``x`` (call twice for two views)."""
        self._check_input(x)
        if not self.params["enabled"]:
            return self.apply(x, {})
        return self.apply(x, self.sample_params(x.shape[0], generator, x.device, input_size=tuple(x.shape[-2:])))

    # ------------------------------------------------------------------ parameters
    def sample_params(
        self,
        batch_size: int,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device | str] = None,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Tensor]:
        """Draw every per-sample random parameter of one view of a batch.

        Returns tensors with leading dim B = ``batch_size``:
            crop (B, 4) int64: top, left, height, width in input pixels (``input_size``, default S x S)
            flip, jitter, grayscale, blur, solarize (B,) bool: whether each op is applied
            brightness, contrast, saturation (B,) float: jitter factors; hue (B,) float: hue shift
            jitter_order (B, 4) int64: a permutation of the op ids BRIGHTNESS, CONTRAST, SATURATION, HUE
            blur_sigma (B,) float: the Gaussian's standard deviation in pixels
        On one channel saturation is 1, hue 0 and grayscale False (no-ops, as in the torchvision path).
        """
        p, B = self.params, int(batch_size)
        height, width = input_size if input_size is not None else (self.image_size, self.image_size)

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * rand(B)

        rgb = self.channels == 3
        b, c = p["brightness"], p["contrast"]
        s, h = (p["saturation"], p["hue"]) if rgb else (0.0, 0.0)
        return {
            "crop": self._sample_crops(B, height, width, rand),
            "flip": rand(B) < p["flip_p"],
            "jitter": rand(B) < p["jitter_p"],
            "brightness": uniform(max(0.0, 1.0 - b), 1.0 + b),
            "contrast": uniform(max(0.0, 1.0 - c), 1.0 + c),
            "saturation": uniform(max(0.0, 1.0 - s), 1.0 + s),
            "hue": uniform(-h, h),
            "jitter_order": rand(B, 4).argsort(dim=1),  # a uniform random permutation per row
            "grayscale": rand(B) < (p["grayscale_p"] if rgb else 0.0),
            "blur": rand(B) < p["blur_p"],
            "blur_sigma": uniform(*BLUR_SIGMA),
            "solarize": rand(B) < p["solarize_p"],
        }

    def _sample_crops(self, B: int, height: int, width: int, rand) -> Tensor:
        """``RandomResizedCrop.get_params`` for B samples at once: (B, 4) int64 (top, left, h, w)."""
        area = float(height * width)
        lo = math.log(CROP_RATIO[0])
        hi = math.log(CROP_RATIO[1])
        target_area = area * (self.params["crop_scale_min"] + (1.0 - self.params["crop_scale_min"]) * rand(B, _CROP_TRIES))
        aspect = torch.exp(lo + (hi - lo) * rand(B, _CROP_TRIES))
        w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, as Python's round
        h = torch.round(torch.sqrt(target_area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.int().argmax(dim=1, keepdim=True)  # the first valid try (argmax returns the first max)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        # fallback when no try is valid: the central crop with the aspect ratio clamped into range
        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            fw, fh = width, int(round(width / CROP_RATIO[0]))
        elif in_ratio > CROP_RATIO[1]:
            fw, fh = int(round(height * CROP_RATIO[1])), height
        else:
            fw, fh = width, height
        any_ok = ok.any(dim=1)
        w = torch.where(any_ok, w, torch.full_like(w, fw))
        h = torch.where(any_ok, h, torch.full_like(h, fh))
        top = torch.floor(rand(B) * (height - h + 1)).clamp_max(height - h)  # randint(0, H - h + 1)
        left = torch.floor(rand(B) * (width - w + 1)).clamp_max(width - w)
        top = torch.where(any_ok, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(any_ok, left, torch.full_like(left, (width - fw) // 2))
        return torch.stack((top, left, h, w), dim=1).long()

    # ------------------------------------------------------------------ the deterministic part
    def apply(self, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Augment ``x`` (uint8 (B, C, H, W), or float in [0, 1]) with given per-sample ``params``
        (as returned by :meth:`sample_params`, on x's device); float32 (B, C, S, S), normalized."""
        self._check_input(x)
        x = TF.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x.float()
        if not self.params["enabled"]:
            x = TF.center_crop(TF.resize(x, [self.image_size], antialias=True), [self.image_size, self.image_size])
            return self._normalize(x)
        x = self._crop_flip(x, params["crop"], params["flip"])
        x = self._color_jitter(x, params)
        if self.channels == 3:
            x = torch.where(_per_sample(params["grayscale"]), _gray(x).expand_as(x), x)
        if self.params["blur_p"] > 0:
            x = torch.where(_per_sample(params["blur"]), self._blur(x, params["blur_sigma"]), x)
        if self.params["solarize_p"] > 0:
            x = torch.where(_per_sample(params["solarize"]) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
        return self._normalize(x)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected a batch of shape (B, {self.channels}, H, W); got {tuple(x.shape)}")

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _crop_flip(self, x: Tensor, crop: Tensor, flip: Tensor) -> Tensor:
        """Crop box -> S x S (bilinear, half-pixel centers as torchvision), mirrored where ``flip``."""
        B, _, H, W = x.shape
        S = self.image_size
        top, left, h, w = crop.to(x.dtype).unbind(1)
        centers = torch.arange(S, device=x.device, dtype=x.dtype) + 0.5  # output pixel centers
        kx = torch.where(flip[:, None], S - centers, centers)  # (B, S): read the row backwards where flipped
        # input pixel-center coordinates, clamped into the box as crop-then-resize clamps at the crop border
        xs = left[:, None] + kx * (w / S)[:, None] - 0.5
        ys = top[:, None] + centers * (h / S)[:, None] - 0.5
        xs = torch.minimum(torch.maximum(xs, left[:, None]), (left + w - 1)[:, None])
        ys = torch.minimum(torch.maximum(ys, top[:, None]), (top + h - 1)[:, None])
        gx = (2.0 * xs + 1.0) / W - 1.0  # align_corners=False normalization
        gy = (2.0 * ys + 1.0) / H - 1.0
        grid = torch.stack((gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)), dim=-1)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        B = x.shape[0]
        applied = params["jitter"]
        order = torch.where(applied[:, None], params["jitter_order"], torch.full_like(params["jitter_order"], NONE))
        if self.channels == 1:  # saturation and hue are no-ops: brightness and contrast in their drawn order
            b_first = (order == BRIGHTNESS).int().argmax(1) < (order == CONTRAST).int().argmax(1)
            first = torch.where(b_first, BRIGHTNESS, CONTRAST)
            slots = torch.stack((first, BRIGHTNESS + CONTRAST - first), 1)
            slots = torch.where(applied[:, None], slots, NONE)
            for i in range(2):
                x = self._blend_slot(x, slots[:, i], params)
            return x
        # RGB: split each sample's order at the hue op into up to 3 ops before it and up to 3 after it
        hue_pos = (order == HUE).int().argmax(1, keepdim=True)  # 0 where jitter is off (order is all NONE)
        pos = torch.arange(3, device=x.device).expand(B, 3)
        pre = torch.where(pos < hue_pos, order.gather(1, pos), NONE)
        post_idx = (hue_pos + 1 + pos).clamp_max(3)
        post = torch.where(hue_pos + 1 + pos <= 3, order.gather(1, post_idx), NONE)
        for i in range(3):
            x = self._blend_slot(x, pre[:, i], params)
        shifted = _shift_hue(x, torch.where(applied, params["hue"], 0.0))
        # a zero shift is skipped as in torchvision: samples without hue shift stay bit-exact
        x = torch.where(_per_sample(applied & (params["hue"] != 0)), shifted, x)
        for i in range(3):
            x = self._blend_slot(x, post[:, i], params)
        return x

    @staticmethod
    def _blend_slot(x: Tensor, op: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Per sample one of brightness / contrast / saturation / nothing (op ids), fused:
        clamp(a x + α mean(gray(x)) + β gray(x), 0, 1) with (a, α, β) = (f, 0, 0) | (c, 1 - c, 0) | (s, 0, 1 - s) | (1, 0, 0)
        (torchvision's ``_blend`` formulas, term for term)."""
        one = torch.ones_like(params["brightness"])
        is_b, is_c, is_s = op == BRIGHTNESS, op == CONTRAST, op == SATURATION
        a = torch.where(is_b, params["brightness"], torch.where(is_c, params["contrast"], torch.where(is_s, params["saturation"], one)))
        alpha = torch.where(is_c, 1.0 - params["contrast"], 0.0)
        # mean of the luma = luma of the channel means: one reduction, no full gray image
        channel_mean = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        offset = _per_sample(alpha) * _gray(channel_mean)  # (B, 1, 1, 1)
        if x.shape[1] == 3:
            beta = torch.where(is_s, 1.0 - params["saturation"], 0.0)
            offset = offset + _per_sample(beta) * _gray(x)  # (B, 1, H, W)
        return torch.addcmul(offset, _per_sample(a), x).clamp_(0.0, 1.0)

    def _blur(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Separable Gaussian blur, one kernel per sample: softmax(-d² / (2 σ²)) over d = -(k-1)/2 .. (k-1)/2."""
        B, C, H, W = x.shape
        k = self.params["blur_kernel"]
        d = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        kernel = torch.softmax(-(d**2) / (2.0 * sigma[:, None] ** 2), dim=1)  # (B, k)
        kernel = kernel.repeat_interleave(C, dim=0)  # (B C, k): one per (sample, channel) group
        y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
        y = F.conv2d(y, kernel.view(B * C, 1, 1, k), groups=B * C)
        y = F.conv2d(y, kernel.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)

"""The SimCLR augmentation: torchvision per-sample path (augment.py) and the batched path (batch_augment.py).

The batched path is checked against a slow, obviously correct reference: torchvision.transforms.v2
functional ops applied one image at a time with the same parameters. Distribution checks use
binomial / normal standard errors with a 4-5σ margin (the seeds are fixed, so they are deterministic).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from simclr_tau.config import AugmentConfig
from simclr_tau.data.augment import CROP_RATIO, eval_transform, resolve_augment, simclr_view_transform
from simclr_tau.data.batch_augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, BatchAugment
from simclr_tau.errors import UserError

MEAN = {1: [0.286], 3: [0.49, 0.48, 0.45]}
STD = {1: [0.353], 3: [0.25, 0.24, 0.26]}
# every op switched off, crops = the whole image: what is left is resize + normalize
IDENTITY = dict(crop_scale_min=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: a second intra-op thread only adds wake-up latency on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(b: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish uint8 images (upsampled noise + a horizontal gradient): crops and flips change them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
    x = 0.7 * x + 0.3 * torch.linspace(0, 1, s).view(1, 1, 1, s)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def reference_view(img: torch.Tensor, prm: dict, i: int, aug: BatchAugment) -> torch.Tensor:
    """Sample i's view with torchvision functional ops, one op at a time, in the documented order."""
    x = TF.to_dtype(img, torch.float32, scale=True)
    top, left, h, w = (int(v) for v in prm["crop"][i])
    x = TF.resized_crop(x, top, left, h, w, [aug.image_size, aug.image_size], antialias=True)
    if prm["flip"][i]:
        x = TF.horizontal_flip(x)
    if prm["jitter"][i]:
        for op in prm["jitter_order"][i].tolist():
            if op == BRIGHTNESS:
                x = TF.adjust_brightness(x, float(prm["brightness"][i]))
            elif op == CONTRAST:
                x = TF.adjust_contrast(x, float(prm["contrast"][i]))
            elif op == SATURATION:
                x = TF.adjust_saturation(x, float(prm["saturation"][i]))  # no-op on one channel
            elif op == HUE:
                x = TF.adjust_hue(x, float(prm["hue"][i]))  # no-op on one channel
    if prm["grayscale"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if prm["blur"][i]:
        k, s = aug.params["blur_kernel"], float(prm["blur_sigma"][i])
        x = TF.gaussian_blur(x, [k, k], [s, s])
    if prm["solarize"][i]:
        x = TF.solarize(x, 0.5)
    return TF.normalize(x, MEAN[x.shape[0]], STD[x.shape[0]])


# ---------------------------------------------------------------------------------- resolve_augment
def test_resolve_augment_size_aware_defaults():
    small = resolve_augment(AugmentConfig(), 28)
    assert (small["crop_scale_min"], small["blur_p"], small["blur_kernel"]) == (0.2, 0.0, 3)
    large = resolve_augment(AugmentConfig(), 96)
    assert (large["crop_scale_min"], large["blur_p"], large["blur_kernel"]) == (0.08, 0.5, 9)
    assert resolve_augment(AugmentConfig(), 224)["blur_kernel"] == 23  # SimCLR's ImageNet kernel
    # jitter_strength 1 is SimCLR's CIFAR setting 0.4/0.4/0.4/0.1, and scales linearly
    assert [small[k] for k in ("brightness", "contrast", "saturation", "hue")] == [0.4, 0.4, 0.4, 0.1]
    assert resolve_augment(AugmentConfig(jitter_strength=0.5), 28)["hue"] == pytest.approx(0.05)
    # explicit values win over the size-aware defaults; a DictConfig works like the dataclass
    cfg = OmegaConf.structured(AugmentConfig(crop_scale_min=0.5, blur_p=0.1))
    explicit = resolve_augment(cfg, 28)
    assert (explicit["crop_scale_min"], explicit["blur_p"]) == (0.5, 0.1)
    assert set(explicit) == {"crop_scale_min", "flip_p", "brightness", "contrast", "saturation", "hue", "jitter_p",
                             "grayscale_p", "blur_p", "blur_kernel", "solarize_p", "enabled"}


@pytest.mark.parametrize("field,value", [("flip_p", 1.5), ("jitter_p", -0.1), ("crop_scale_min", 0.0), ("jitter_strength", 6.0)])
def test_resolve_augment_rejects_out_of_range_values(field, value):
    with pytest.raises(UserError, match=f"augment.{field}"):
        resolve_augment(AugmentConfig(**{field: value}), 32)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 16), (3, 48)])  # blur kernel 3, 3, 5
def test_batched_views_equal_the_per_image_torchvision_reference(channels, size):
    # every op on some samples, strong jitter so that the clamps (and hence the op order) matter
    cfg = AugmentConfig(jitter_strength=2.0, flip_p=0.5, jitter_p=0.75, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    aug = BatchAugment(cfg, size, channels, MEAN[channels], STD[channels])
    x = images(48, channels, size)
    prm = aug.sample_params(48, torch.Generator().manual_seed(1))
    assert prm["jitter"].any() and prm["blur"].any() and prm["solarize"].any() and prm["flip"].any()
    out = aug.apply(x, prm)
    ref = torch.stack([reference_view(x[i], prm, i, aug) for i in range(48)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("channels,in_size,size", [(1, 28, 28), (3, 16, 16), (3, 28, 32), (1, 32, 16)])
def test_identity_config_equals_eval_transform(channels, in_size, size):
    x = images(6, channels, in_size)
    ref = torch.stack([eval_transform(size, channels, MEAN[channels], STD[channels])(img) for img in x])
    # enabled=False: resize (antialiased) + center crop + normalize, for both paths
    off = AugmentConfig(enabled=False)
    torch.testing.assert_close(BatchAugment(off, size, channels, MEAN[channels], STD[channels])(x), ref, atol=1e-5, rtol=0)
    view = simclr_view_transform(off, size, channels, MEAN[channels], STD[channels])
    torch.testing.assert_close(torch.stack([view(img) for img in x]), ref, atol=1e-5, rtol=0)
    if in_size <= size:  # all probabilities 0, crop scale 1 (whole image): the random path is resize + normalize too
        ident = AugmentConfig(**IDENTITY)
        torch.testing.assert_close(BatchAugment(ident, size, channels, MEAN[channels], STD[channels])(x), ref, atol=1e-5, rtol=0)
        view = simclr_view_transform(ident, size, channels, MEAN[channels], STD[channels])
        torch.testing.assert_close(torch.stack([view(img) for img in x]), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_flip_only_equals_flip(channels):
    cfg = AugmentConfig(**{**IDENTITY, "flip_p": 1.0})
    x = images(5, channels, 16)
    ref = TF.normalize(TF.to_dtype(x.flip(-1), torch.float32, scale=True), MEAN[channels], STD[channels])
    torch.testing.assert_close(BatchAugment(cfg, 16, channels, MEAN[channels], STD[channels])(x), ref, atol=1e-5, rtol=0)
    view = simclr_view_transform(cfg, 16, channels, MEAN[channels], STD[channels])
    torch.testing.assert_close(torch.stack([view(img) for img in x]), ref, atol=1e-5, rtol=0)


def test_solarize_and_brightness_equal_torchvision():
    x = images(5, 3, 16)
    xf = TF.to_dtype(x, torch.float32, scale=True)
    solarize = BatchAugment(AugmentConfig(**{**IDENTITY, "solarize_p": 1.0}), 16, 3, MEAN[3], STD[3])
    torch.testing.assert_close(solarize(x), TF.normalize(TF.solarize(xf, 0.5), MEAN[3], STD[3]), atol=1e-6, rtol=0)
    # brightness alone, fixed factors f (one above 1, so the clamp is exercised)
    aug = BatchAugment(AugmentConfig(**IDENTITY), 16, 3, MEAN[3], STD[3])
    prm = aug.sample_params(5)
    f = torch.tensor([0.6, 0.9, 1.0, 1.3, 1.8])
    prm.update(jitter=torch.ones(5, dtype=torch.bool), brightness=f, contrast=torch.ones(5), saturation=torch.ones(5), hue=torch.zeros(5))
    ref = torch.stack([TF.normalize(TF.adjust_brightness(xf[i], float(f[i])), MEAN[3], STD[3]) for i in range(5)])
    torch.testing.assert_close(aug.apply(x, prm), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- distributions
def test_sampled_parameters_follow_the_recipe():
    B = 4000
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.1)
    aug = BatchAugment(cfg, 28, 3, MEAN[3], STD[3])
    prm = aug.sample_params(B, torch.Generator().manual_seed(0))
    p = aug.params
    for key, rate in [("flip", p["flip_p"]), ("jitter", p["jitter_p"]), ("grayscale", p["grayscale_p"]),
                      ("blur", p["blur_p"]), ("solarize", p["solarize_p"])]:
        sigma = math.sqrt(rate * (1 - rate) / B)
        assert abs(prm[key].float().mean().item() - rate) < 4 * sigma, key
    # crops: whole pixels inside the image; area fraction in [s_min, 1] and aspect in [3/4, 4/3] up to rounding to pixels
    top, left, h, w = prm["crop"].double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert ((w + 0.5) * (h + 0.5) >= p["crop_scale_min"] * 28 * 28).all() and (w * h <= 28 * 28).all()
    assert ((w - 0.5) / (h + 0.5) <= CROP_RATIO[1]).all() and ((w + 0.5) / (h - 0.5) >= CROP_RATIO[0]).all()
    # and the same distribution as torchvision's RandomResizedCrop.get_params (mean area, mean log aspect)
    rrc = RandomResizedCrop(28, scale=(p["crop_scale_min"], 1.0), ratio=CROP_RATIO)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = [rrc.make_params([torch.zeros(1, 28, 28)]) for _ in range(B)]
    tv_hw = torch.tensor([[q["height"], q["width"]] for q in tv], dtype=torch.float64)
    tv_h, tv_w = tv_hw.unbind(1)
    for name, ours, theirs in [("area", h * w / 784, tv_h * tv_w / 784), ("log aspect", (w / h).log(), (tv_w / tv_h).log())]:
        se = math.sqrt(ours.var().item() / B + theirs.var().item() / B)
        assert abs(ours.mean().item() - theirs.mean().item()) < 4 * se, name
    # jitter factors: uniform on their ranges (min/max near the ends, mean at the center)
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.6, 1.4), "hue": (-0.1, 0.1), "blur_sigma": (0.1, 2.0)}
    for key, (lo, hi) in ranges.items():
        v, eps = prm[key], 0.01 * (hi - lo)
        assert lo <= v.min() < lo + eps and hi - eps < v.max() <= hi, key
        assert abs(v.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * B), key
    # each row of jitter_order is a permutation of the 4 ops, and each op comes first 1/4 of the time
    assert (prm["jitter_order"].sort(dim=1).values == torch.arange(4)).all()
    first = torch.bincount(prm["jitter_order"][:, 0], minlength=4).double() / B
    assert (first - 0.25).abs().max() < 4 * math.sqrt(0.25 * 0.75 / B)


def test_grayscale_images_skip_saturation_hue_and_grayscale():
    aug = BatchAugment(AugmentConfig(grayscale_p=1.0), 28, 1, MEAN[1], STD[1])
    prm = aug.sample_params(500, torch.Generator().manual_seed(0))
    assert not prm["grayscale"].any() and (prm["saturation"] == 1).all() and (prm["hue"] == 0).all()
    assert prm["brightness"].std() > 0.1 and prm["contrast"].std() > 0.1  # brightness and contrast still apply
    # and the torchvision path builds no saturation/hue/grayscale step for one channel
    t = simclr_view_transform(AugmentConfig(grayscale_p=1.0), 28, 1, MEAN[1], STD[1])
    names = [type(s).__name__ for s in t.transforms]
    assert "RandomGrayscale" not in names
    jitter = next(s for s in t.transforms if type(s).__name__ == "RandomApply").transforms[0]
    assert jitter.saturation is None and jitter.hue is None and jitter.brightness == pytest.approx((0.6, 1.4))


def test_torchvision_pipeline_is_built_from_the_resolved_recipe():
    cfg = AugmentConfig(blur_p=0.4, solarize_p=0.1, jitter_strength=0.5)
    p = resolve_augment(cfg, 32)
    transforms = simclr_view_transform(cfg, 32, 3, MEAN[3], STD[3]).transforms
    steps = {type(s).__name__: s for s in transforms}
    crop = steps["RandomResizedCrop"]
    assert tuple(crop.size) == (32, 32) and tuple(crop.scale) == (0.2, 1.0) and tuple(crop.ratio) == CROP_RATIO
    assert steps["RandomHorizontalFlip"].p == 0.5 and steps["RandomGrayscale"].p == 0.2 and steps["RandomSolarize"].p == 0.1
    jitter_apply, blur_apply = [s for s in transforms if type(s).__name__ == "RandomApply"]  # in this order
    jitter, blur = jitter_apply.transforms[0], blur_apply.transforms[0]
    assert jitter_apply.p == 0.8 and blur_apply.p == 0.4
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.8, 1.2))
    assert jitter.hue == pytest.approx((-0.05, 0.05))
    assert list(blur.kernel_size) == [p["blur_kernel"]] * 2 and tuple(blur.sigma) == (0.1, 2.0)
    assert steps["RandomSolarize"].threshold == 0.5


def _stats(v: torch.Tensor) -> torch.Tensor:
    """Per-view summaries (n, 7): channel means, left-right and top-bottom differences, pixel std,
    mean absolute horizontal gradient (fine detail, which blur removes)."""
    half = v.shape[-1] // 2
    return torch.cat(
        [
            v.mean(dim=(2, 3)),
            (v[..., :half].mean(dim=(1, 2, 3)) - v[..., half:].mean(dim=(1, 2, 3)))[:, None],
            (v[..., :half, :].mean(dim=(1, 2, 3)) - v[..., half:, :].mean(dim=(1, 2, 3)))[:, None],
            v.std(dim=(1, 2, 3))[:, None],
            (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))[:, None],
        ],
        dim=1,
    ).double()


def test_batched_and_torchvision_views_have_the_same_distribution():
    # the same image, n views each way; every op on. Compare mean and std of each summary statistic with a
    # z-test: SE(mean diff) = sqrt(var_a/n + var_b/n); SE(std) ≈ sqrt((μ4 - σ⁴) / n) / (2σ) (delta method).
    n = 1200
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.3)
    img = images(1, 3, 16, seed=3)[0]
    img[:, ::2, ::2] //= 2  # fine texture, so that blur shows
    with torch.random.fork_rng():
        torch.manual_seed(0)
        view = simclr_view_transform(cfg, 16, 3, MEAN[3], STD[3])
        tv = _stats(torch.stack([view(img) for _ in range(n)]))
    aug = BatchAugment(cfg, 16, 3, MEAN[3], STD[3])
    ours = _stats(aug(img.expand(n, -1, -1, -1), torch.Generator().manual_seed(0)))

    def std_se(a: torch.Tensor) -> torch.Tensor:
        c = a - a.mean(0)
        var, m4 = (c**2).mean(0), (c**4).mean(0)
        return ((m4 - var**2) / n).sqrt() / (2 * var.sqrt())

    z_mean = (ours.mean(0) - tv.mean(0)) / (ours.var(0) / n + tv.var(0) / n).sqrt()
    z_std = (ours.std(0) - tv.std(0)) / (std_se(ours) ** 2 + std_se(tv) ** 2).sqrt()
    assert z_mean.abs().max() < 4.5, z_mean
    assert z_std.abs().max() < 4.5, z_std
    # the test has power: without flips the left-right statistic moves by many standard errors
    noflip = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.3, flip_p=0.0), 16, 3, MEAN[3], STD[3])
    lr = _stats(noflip(img.expand(n, -1, -1, -1), torch.Generator().manual_seed(0)))[:, 3]
    assert abs(lr.mean() - tv[:, 3].mean()) / (lr.var() / n + tv[:, 3].var() / n).sqrt() > 10


# ---------------------------------------------------------------------------------- independence, determinism
def test_samples_and_views_are_independent():
    aug = BatchAugment(AugmentConfig(), 28, 3, MEAN[3], STD[3])
    B = 4000
    prm = aug.sample_params(B, torch.Generator().manual_seed(0))
    top, left, h, w = prm["crop"].double().unbind(1)
    for v in (top, left, h * w, prm["brightness"].double()):
        r = torch.corrcoef(torch.stack([v[:-1], v[1:]]))[0, 1]  # neighbouring samples
        assert abs(r) < 4 / math.sqrt(B)
    assert 0 < prm["flip"].sum() < B
    assert len({tuple(c) for c in prm["crop"].tolist()}) > B // 4  # many distinct crops
    x = images(1, 3, 28).expand(64, -1, -1, -1)  # one image repeated: its views must all differ
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(x, g), aug(x, g)
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 0  # the two views of each image differ
    assert (v1[1:] - v1[:1]).flatten(1).abs().amax(1).min() > 0  # as do the views of different samples


def test_same_seed_same_views_other_seed_other_views():
    aug = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.2), 16, 3, MEAN[3], STD[3])
    x = images(32, 3, 16)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 28, 32])
def test_output_shape_dtype_device(channels, size):
    x = images(4, channels, size)
    aug = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.5), size, channels, MEAN[channels], STD[channels])
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, channels, size, size) and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()
    view = simclr_view_transform(AugmentConfig(blur_p=0.5, solarize_p=0.5), size, channels, MEAN[channels], STD[channels])(x[0])
    assert type(view) is torch.Tensor and view.shape == (channels, size, size) and view.dtype == torch.float32
    ev = eval_transform(size, channels, MEAN[channels], STD[channels])(x[0])
    assert ev.shape == (channels, size, size) and ev.dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        aug(x[:, :1] if channels == 3 else x.expand(-1, 3, -1, -1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_stay_on_the_device_and_follow_the_generator():
    aug = BatchAugment(AugmentConfig(blur_p=0.5), 32, 3, MEAN[3], STD[3]).cuda()
    x = images(16, 3, 32).cuda()
    a = aug(x, torch.Generator(device="cuda").manual_seed(0))
    b = aug(x, torch.Generator(device="cuda").manual_seed(0))
    assert a.device == x.device and torch.equal(a, b)
    prm = aug.sample_params(16, torch.Generator(device="cuda").manual_seed(0), "cuda")
    ref = BatchAugment(AugmentConfig(blur_p=0.5), 32, 3, MEAN[3], STD[3]).apply(x.cpu(), {k: v.cpu() for k, v in prm.items()})
    torch.testing.assert_close(aug.apply(x, prm).cpu(), ref, atol=1e-4, rtol=0)

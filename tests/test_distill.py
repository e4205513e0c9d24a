"""Distillation: the α·CE + (1 − α)·T²·KL objective vs a float64 reference, gradient reversal on T (sign and
λ scale), the cosine λ ramp, the SEED queue, labels paired with the loaders' batches, end-to-end SEED / KD
(fixed, annealed, CTKD) runs from a tiny pretrained teacher with export + kNN, resume, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from simclr_tau.config import AugmentConfig, load_config
from simclr_tau.config import load_distill_config
from simclr_tau.train.distill import _with_labels, run
from simclr_tau.temperature.grl import GradientReversal, cosine_ramp, grad_reverse
from simclr_tau.losses import relational_kd_loss
from simclr_tau.methods.distill import SEED, FrozenTeacher, LogitKD, kd_objective
from simclr_tau.temperature import FixedTemperature, LearnableTemperature
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")


def _log_softmax(values):
    m = max(values)
    z = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - z for v in values]


def reference_objective(student, teacher, labels, temps, alpha) -> float:
    """Per sample: α·(−log softmax(s)_y) + (1 − α)·T²·Σ_c p_t (log p_t − log p_s), averaged (float64 Python)."""
    total = 0.0
    for s, t, y, T in zip(student.double().tolist(), teacher.double().tolist(), labels.tolist(), temps):
        ce = -_log_softmax(s)[y]
        ls, lt = _log_softmax([v / T for v in s]), _log_softmax([v / T for v in t])
        kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
        total += alpha * ce + (1 - alpha) * T**2 * kl
    return total / len(temps)


# ---- objective, gradient reversal, ramp ---------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", [1.0, 4.0, 10.0, "per_sample"])
def test_kd_objective_matches_float64_reference(alpha, T):
    g = torch.Generator().manual_seed(3)
    s = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    T_arg = (0.5 + 4 * torch.rand(6, generator=g, dtype=torch.float64)) if T == "per_sample" else T
    temps = T_arg.tolist() if T == "per_sample" else [T] * 6
    loss, ce, kd = kd_objective(s, t, y, T_arg, alpha)
    assert float(loss) == pytest.approx(reference_objective(s, t, y, temps, alpha), rel=1e-10, abs=1e-12)
    assert float(loss) == pytest.approx(alpha * float(ce) + (1 - alpha) * float(kd), rel=1e-12)


def test_kd_objective_keeps_the_T_squared_factor():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    _, _, kd = kd_objective(s, t, y, 10.0, 0.5)
    kl = nn.functional.kl_div(torch.log_softmax(s / 10, 1), torch.log_softmax(t / 10, 1), log_target=True,
                              reduction="batchmean")
    assert float(kd) == pytest.approx(100 * float(kl), rel=1e-10)


def _T_grad(lambd):
    """Gradient of the KD objective w.r.t. a learnable T's parameter θ (and the student logits), with a GRL of
    factor λ in front of T (None: no GRL)."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_()
    t, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    temp = LearnableTemperature(4.0, "log").double()
    T = temp()
    if lambd is not None:
        T = grad_reverse(T, lambd)
    kd_objective(s, t, y, T, 0.3)[0].backward()
    return temp.theta.grad.clone(), s.grad.clone()


@pytest.mark.parametrize("lambd", [1.0, 0.25, 3.0])
def test_gradient_reversal_flips_and_scales_T_gradient(lambd):
    g_plain, s_plain = _T_grad(None)
    g_grl, s_grl = _T_grad(lambd)
    assert float(g_plain) != 0.0
    assert float(g_grl) == pytest.approx(-lambd * float(g_plain), rel=1e-12)  # T ascends the loss
    assert torch.equal(s_plain, s_grl)  # the student's gradient is untouched: it still descends
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = GradientReversal(lambd)(x)
    assert torch.equal(y, x)  # identity forward
    (y * torch.tensor([2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-2.0 * lambd, -3.0 * lambd])


def test_cosine_ramp_values():
    lo, hi, n = 0.1, 1.0, 100
    expected = {0: 0.1, 25: 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2, 50: 0.55, 75: 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2,
                100: 1.0, 150: 1.0}
    for step, v in expected.items():
        assert cosine_ramp(step, n, lo, hi) == pytest.approx(v, abs=1e-12)
        # CTKD's own form: λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(n/E, 1))π))
        assert cosine_ramp(step, n, lo, hi) == pytest.approx(lo + 0.5 * (hi - lo) * (1 + math.cos((1 + min(step / n, 1)) * math.pi)))
    assert cosine_ramp(25, n, lo, hi) == pytest.approx(0.231802, abs=1e-6)
    with pytest.raises(ValueError):
        cosine_ramp(0, 0, lo, hi)


# ---- method modules --------------------------------------------------------------------------

def _tiny_teacher(out: int = 6, probe: bool = False) -> FrozenTeacher:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(16, out), nn.BatchNorm1d(out))
    p = None
    if probe:
        p = {"weight": torch.randn(out, 3), "bias": torch.randn(3), "mean": torch.randn(out), "std": torch.rand(out) + 0.5}
    return FrozenTeacher(enc, out, [2.0], [0.5], p)


def test_seed_queue_fills_then_wraps_and_the_loss_uses_only_filled_entries():
    teacher = _tiny_teacher()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    method = SEED(teacher, student, nn.Linear(8, 6), FixedTemperature(0.2), FixedTemperature(0.05), queue_size=10)
    method.train()
    assert not teacher.training and not teacher.encoder[2].training  # the teacher stays in eval mode
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(4):
        x = torch.randn(4, 1, 4, 4, generator=g)
        t = teacher(x)
        filled = torch.cat(seen)[-10:] if seen else None
        if filled is not None and len(filled) == 10:  # wrapped: the queue holds the last 10 in ring order
            ptr = (4 * step) % 10
            filled = torch.roll(filled, shifts=ptr, dims=0)
        expected = relational_kd_loss(method.projector(method.encoder(x)), t, filled, 0.2, 0.05)
        loss, logs = method(x)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        assert set(logs) == {"tau_s", "tau_t"}
        seen.append(nn.functional.normalize(t, dim=1))
        assert int(method.queue_count) == min(4 * (step + 1), 10)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    method.eval()
    before = method.queue.clone()
    method(torch.randn(4, 1, 4, 4))
    assert torch.equal(before, method.queue)  # evaluation does not enqueue


def test_logit_kd_module_reverses_only_T_gradient_under_ctkd():
    def grads(grl):
        teacher = _tiny_teacher(probe=True)
        torch.manual_seed(1)
        student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        m = LogitKD(teacher, student, nn.Linear(8, 3), LearnableTemperature(4.0), 0.5, grl,
                    (lambda step: cosine_ramp(step, 10, 0.0, 1.0)) if grl is not None else None)
        m.train()
        m.before_step(5)
        x, y = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
        loss, logs = m(x, y)
        loss.backward()
        return m.temperature.theta.grad.clone(), m.classifier.weight.grad.clone(), logs

    g_plain, w_plain, _ = grads(None)
    g_grl, w_grl, logs = grads(GradientReversal())
    assert float(logs["grl_lambda"]) == pytest.approx(0.5)  # before_step(5) of a 10-step ramp
    assert float(g_grl) == pytest.approx(-0.5 * float(g_plain), rel=1e-6)
    assert torch.allclose(w_plain, w_grl)
    assert {"T", "ce", "kd", "student_acc", "teacher_acc"} <= set(logs)


def test_labels_follow_the_loaders_slices():
    """Image i has pixel value i, so every sample of a batch says which image it is."""
    from simclr_tau.data.batch_augment import BatchAugment
    from simclr_tau.data.pipeline import EpochSampler
    from simclr_tau.train.loaders import BatchedLoader

    n, micro, world, accum = 64, 8, 2, 2
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(0)) + 100
    aug = BatchAugment(AugmentConfig(enabled=False), 4, 1, [0.0], [1.0])
    for rank in range(world):
        loader = BatchedLoader(images, aug, EpochSampler(n, 3), micro, world, rank, 0, torch.device("cpu"))
        groups = list(_with_labels(loader.epoch(1, skip_steps=1, accum=accum), labels, EpochSampler(n, 3), 1, 1, accum,
                                   micro, world, rank))
        assert len(groups) == n // micro // accum - 1
        for group in groups:
            assert len(group) == accum
            for x, y in group:
                index = (x[:, 0, 0, 0] * 255).round().long()
                assert x.shape[0] == 2 * micro // world and torch.equal(y, labels[index])


# ---- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    from simclr_tau.train.pretrain import run as pretrain

    out = tmp_path_factory.mktemp("teacher")
    return pretrain(load_config(TINY, [f"train.output_dir={out}", "train.run_name=teacher"])).run_dir


def distill_cfg(tmp_path: Path, teacher: Path, *overrides: str):
    return load_distill_config(TINY, [f"train.output_dir={tmp_path}", f"teacher.path={teacher}", "model.backbone=resnet10t",
                                      "distill.queue_size=48", *overrides])


def rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_seed_end_to_end_logs_both_taus_exports_the_student_and_knn_evaluates_it(tmp_path, teacher_run, capsys):
    from simclr_tau.cli import main
    from simclr_tau.models.export import load_encoder

    cfg = distill_cfg(tmp_path, teacher_run, "train.run_name=seed", "train.method=seed",
                      "temperature.mode=learnable", "temperature.init=0.2", "optim.lr=2.0",
                      "teacher_temperature.mode=scheduled", "teacher_temperature.schedule.kind=linear",
                      "teacher_temperature.schedule.start=0.1", "teacher_temperature.schedule.end=0.02")
    result = run(cfg)
    r = rows(result.run_dir)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    assert all(math.isfinite(x["train/loss"]) for x in r) and r[-1]["train/loss"] > 0
    # τ_t follows its schedule (set before each step); τ_s is trained
    assert [x["train/tau_t"] for x in r] == pytest.approx([0.1 - 0.08 * s / 4 for s in range(4)], rel=1e-6)
    assert r[-1]["train/tau_s"] != pytest.approx(0.2, abs=1e-6)
    encoder, meta = load_encoder(result.run_dir / "encoder.safetensors")
    assert meta["model"]["backbone"] == "resnet10t" and meta["in_chans"] == 1
    ckpt = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])
    assert not any(k.startswith("teacher.") for k in ckpt["model"]) and "queue" in ckpt["model"]
    assert torch.equal(encoder.state_dict()["conv1.0.weight"], ckpt["model"]["encoder.conv1.0.weight"])
    main(["knn", str(result.run_dir), "--k", "5", "--t", "0.1", "--no-progress"])  # the student evaluates like a pretrained run
    assert "top1_k5_t0.1" in json.dumps(json.loads((result.run_dir / "eval" / "knn.json").read_text()))


KD_T_MODES = {
    "fixed": ["temperature.mode=fixed", "temperature.init=4.0"],
    "annealed": ["temperature.mode=scheduled", "temperature.schedule.kind=linear", "temperature.schedule.start=8.0",
                 "temperature.schedule.end=2.0"],
    "ctkd": ["temperature.mode=learnable", "temperature.init=4.0", "temperature.tau_min=1.0", "temperature.tau_max=21.0",
             "distill.ctkd=true", "distill.grl_lambda_min=0.2", "distill.grl_lambda_max=1.0", "optim.lr=2.0"],
}


@pytest.mark.parametrize("mode", list(KD_T_MODES))
def test_kd_end_to_end_logs_T_and_exports_the_student(tmp_path, teacher_run, mode):
    cfg = distill_cfg(tmp_path, teacher_run, f"train.run_name=kd-{mode}", "train.method=kd", "distill.alpha=0.5",
                      *KD_T_MODES[mode])
    result = run(cfg)
    r = rows(result.run_dir)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    Ts = [x["train/T"] for x in r]
    if mode == "fixed":
        assert Ts == pytest.approx([4.0] * 4)
    elif mode == "annealed":
        assert Ts == pytest.approx([8.0 - 6.0 * s / 4 for s in range(4)], rel=1e-6)
    else:
        assert [x["train/grl_lambda"] for x in r] == pytest.approx([cosine_ramp(s, 4, 0.2, 1.0) for s in range(4)], rel=1e-6)
        assert Ts[-1] > Ts[0]  # T ascends the loss (the KD term grows with T here)
    for x in r:
        assert x["train/loss"] == pytest.approx(0.5 * x["train/ce"] + 0.5 * x["train/kd"], rel=1e-4)
    assert (result.run_dir / "encoder.safetensors").is_file() and (result.run_dir / "teacher_probe.safetensors").is_file()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and 0.0 <= summary["teacher/linear_test_top1"] <= 100.0


def test_kd_reuses_a_saved_teacher_probe(tmp_path, teacher_run):
    first = run(distill_cfg(tmp_path, teacher_run, "train.run_name=a", "train.method=kd", "temperature.init=4.0",
                            "train.max_steps=1"))
    probe = first.run_dir / "teacher_probe.safetensors"
    second = run(distill_cfg(tmp_path, teacher_run, "train.run_name=b", "train.method=kd", "temperature.init=4.0",
                             "train.max_steps=1", f"teacher.probe={probe}"))
    assert not (second.run_dir / "teacher_probe.safetensors").exists()
    assert rows(second.run_dir)[0]["train/teacher_acc"] == rows(first.run_dir)[0]["train/teacher_acc"]


def test_resume_gives_the_same_student_as_an_uninterrupted_run(tmp_path, teacher_run):
    common = ["train.method=seed", "train.epochs=2", "train.save_every_steps=2", "train.keep_last=10",
              "train.deterministic=true", "temperature.mode=learnable", "optim.lr=1.0"]
    full = run(distill_cfg(tmp_path, teacher_run, "train.run_name=full", *common))
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full.run_dir / "checkpoints" / "step_00000006.pt", part / "checkpoints")
    shutil.copy(full.run_dir / "metrics.jsonl", part / "metrics.jsonl")
    resumed = run(distill_cfg(tmp_path, teacher_run, "train.run_name=part", *common), resume="auto")
    assert resumed.step == full.step == 8
    a = load_checkpoint(list_checkpoints(full.run_dir / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(part / "checkpoints")[-1])["model"]
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    assert [x["train/loss"] for x in rows(part)] == [x["train/loss"] for x in rows(full.run_dir)]


# ---- bad input ----------------------------------------------------------------------------------

def _cli_error(capsys, tmp_path, *overrides) -> str:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", TINY, f"train.output_dir={tmp_path}", *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_teacher_is_a_one_line_error(tmp_path, teacher_run, capsys):
    assert "no such run directory, encoder file or checkpoint" in _cli_error(capsys, tmp_path, "teacher.path=/nonexistent/run")
    ckpt = list_checkpoints(teacher_run / "checkpoints")[-1]
    err = _cli_error(capsys, tmp_path, f"teacher.path={ckpt}", "teacher.model={backbone: resnet18, small_stem: true}")
    assert "does not match the encoder architecture" in err and "teacher.path=" in err
    err = _cli_error(capsys, tmp_path, f"teacher.path={teacher_run / 'encoder.safetensors'}",
                     "teacher.model={backbone: resnet18, small_stem: true}")
    assert "does not match the encoder architecture" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert "not a readable safetensors file" in _cli_error(capsys, tmp_path, f"teacher.path={broken}")
    assert "teacher.path is empty" in _cli_error(capsys, tmp_path)
    err = _cli_error(capsys, tmp_path, f"teacher.path={teacher_run}", "data.channels=rgb")  # 3-channel data, 1-channel teacher
    assert "expects 1-channel images but the data give 3; set data.channels=native" in err


BAD_CONFIG = {
    "T = 0": (["temperature.init=0"], "temperature.init=0"),
    "T < 0": (["train.method=kd", "temperature.init=-2.0"], "temperature.init=-2.0"),
    "tau_t <= 0": (["teacher_temperature.init=0.0"], "teacher_temperature.init=0.0"),
    "scheduled T <= 0": (["temperature.mode=scheduled", "temperature.schedule.start=-1.0"], "temperature.schedule.start"),
    "ctkd without a bounded learnable T": (["train.method=kd", "distill.ctkd=true"], "distill.ctkd=true needs"),
    "alpha": (["train.method=kd", "distill.alpha=1.5"], "distill.alpha=1.5"),
    "method": (["train.method=simclr"], "train.method='simclr' is not valid for distillation"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_is_a_one_line_error(tmp_path, teacher_run, capsys, case):
    overrides, expected = BAD_CONFIG[case]
    assert expected in _cli_error(capsys, tmp_path, f"teacher.path={teacher_run}", *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seed", "kd"])
def test_two_processes_give_the_same_per_step_losses_as_one(tmp_path, teacher_run, method):
    """A real 2-process gloo group (torchrun) vs one process: same global batch, seeds, labels, queue."""
    import os
    import sys

    from procs import free_port, run_proc
    from procs import BN_FREE  # a BatchNorm-free student

    overrides = [*BN_FREE, "train.epochs=2", f"train.method={method}", f"teacher.path={teacher_run}", "distill.queue_size=64",
                 "temperature.mode=learnable", "optim.lr=1.0",
                 *(["temperature.lr_scale=50"] if method == "seed" else
                   ["temperature.init=4.0", "temperature.tau_min=1.0", "temperature.tau_max=10.0"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = ["-m", "simclr_tau.distill", TINY, f"train.output_dir={tmp_path}", *overrides]
    one = run_proc([sys.executable, *cmd, "train.run_name=one"], env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_proc([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), *cmd, "train.run_name=two"], env)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(1, 9))
    key = "train/tau_s" if method == "seed" else "train/T"
    for a, b in zip(r1, r2):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), (a, b)
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    assert r1[-1][key] != pytest.approx(r1[0][key], rel=1e-3)  # the temperature did train


def test_a_diverging_run_stops_with_a_one_line_error_and_keeps_only_finite_checkpoints(tmp_path, teacher_run):
    cfg = distill_cfg(tmp_path, teacher_run, "train.run_name=nan", "optim.lr=1e30", "train.save_every_steps=1")
    # caught as a non-finite loss or, when the loss was still finite, as a diverged state before a save
    with pytest.raises(ValueError, match=r"(non-finite loss at|diverged state after) step \d+") as exc:
        run(cfg)
    bad = int(re.search(r"step (\d+)", str(exc.value)).group(1))
    saved = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "nan" / "checkpoints")]
    assert all(s < bad for s in saved)
    assert "error" in json.loads((tmp_path / "nan" / "summary.json").read_text())


@pytest.mark.parametrize("name", ["distill_fmnist_seed.yaml", "distill_fmnist_kd.yaml"])
def test_shipped_configs_load(name):
    cfg = load_distill_config(str(REPO / "configs" / name))
    assert cfg.train.method in ("seed", "kd") and cfg.teacher.path

"""Every config knob against bad values: each is refused with one line naming the key, the value, what is
accepted and the override that set it, or is accepted on purpose, for the reason its row gives.

The knobs are read from the dataclasses of ``simclr_tau/config/schema.py`` (pretraining's ``Config`` and
distillation's ``DistillConfig``), so a new knob without a row fails :func:`test_every_knob_has_a_row`. A row
decides, for a number, each of zero, negative and huge (:func:`num`: refused, or a string saying why it is
accepted), plus values of its own; every float also gets nan / inf / -inf / a word, every int a word and 1.5,
every switch a word, every choice an unknown name, and every Optional knob ``null`` (accepted). This table is
written independently of the rules in ``simclr_tau/config/ranges.py``: it is what they must do.

Values are checked through ``load_config`` (the rules hold on load); what only a run can check (a path, this
machine, the dataset's size) is checked by real command lines at the end, for exit 2 and one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import pytest
import torch

from procs import ENV, TINY, run_proc
from simclr_tau.config import load_config, load_distill_config
from simclr_tau.config.schema import Config, DistillConfig
from simclr_tau.errors import UserError

Verdict = Union[bool, str]  # True: refused; a string: accepted, because ...
REFUSED = True
LONG = "a long span is legal: the run or the schedule is stretched over it"
FLAT_TAU = "a large τ is legal: a flat softmax, an uninformative but finite loss"
Value = Union[str, Tuple[str, Sequence[str]]]  # an override value, or (value, context overrides it needs)


@dataclass
class Row:
    bad: List[Value] = field(default_factory=list)
    ok: Dict[str, str] = field(default_factory=dict)  # value -> why it is accepted
    kind: str = ""  # num / choice / switch / free


def num(zero: Verdict = REFUSED, negative: Verdict = REFUSED, huge: Verdict = REFUSED, bad: Sequence[Value] = (),
        ok: Dict[str, str] | None = None) -> Row:
    row = Row(list(bad), dict(ok or {}), "num")
    for value, verdict in (("0", zero), ("-1", negative), ("HUGE", huge)):
        if verdict is REFUSED:
            row.bad.append(value)
        else:
            row.ok[value] = verdict
    return row


def choice(*bad: Value) -> Row:
    return Row(["bogus", *bad], {}, "choice")


def switch(*bad: Value) -> Row:
    return Row(["maybe", *bad], {}, "switch")


def free(why: str, bad: Sequence[Value] = (), ok: Sequence[str] = ("x",)) -> Row:
    """Any value of the type, on purpose (``why``); ``ok``: a few such values."""
    return Row(list(bad), {v: why for v in ok}, "free")


PROB = dict(zero="0: never", huge=REFUSED, bad=["1.5"])
SCHEDULED_STEP = ["temperature.mode=scheduled", "temperature.schedule.kind=step"]

ROWS: Dict[str, Row] = {
    # ---- temperature.schedule (also data.mixture.schedule: SAME_ROWS) ----
    "temperature.schedule.kind": choice(),
    "temperature.schedule.start": num(huge=FLAT_TAU),
    "temperature.schedule.end": num(huge=FLAT_TAU),
    "temperature.schedule.period_epochs": num(huge=LONG),
    "temperature.schedule.gamma": num(huge="read by the decaying kinds only, which refuse >= 1 (bad row)",
                                      bad=[("1.5", SCHEDULED_STEP)]),
    "temperature.schedule.every_epochs": num(huge=LONG),
    "temperature.schedule.warmup_epochs": num(zero="0: no warm-up", huge=LONG),
    "temperature.schedule.warmup_start": num(huge=FLAT_TAU),
    "temperature.schedule.patience": num(huge="a patience longer than the run never drops: legal"),
    "temperature.schedule.monitor_mode": choice(),
    # ---- data.mixture ----
    "data.mixture.weighting": choice("sizes"),
    "data.mixture.temperature": num(huge="T -> inf is the uniform mixture: legal"),
    "data.mixture.num_samples": num(huge="draws per epoch: a long epoch is legal"),
    # ---- temperature.dro / adaptive ----
    "temperature.dro.per_sample": switch(),
    "temperature.dro.rho": num(huge="a radius past log N asks for the uniform softmax: τ runs to its bound"),
    "temperature.dro.eta": num(huge="a large τ step is projected onto [tau_min, tau_max]"),
    "temperature.dro.beta": num(huge=REFUSED, bad=["1.5"], ok={"1": "1: no momentum"}),
    "temperature.dro.estimator": choice(),
    "temperature.dro.gamma": num(bad=["1.5"]),
    "temperature.dro.gamma_schedule": choice(),
    "temperature.dro.gamma_decay_epochs": num(huge=LONG),
    "temperature.adaptive.alpha": num(zero="0: τ stays at init", huge="a strong coupling: τ is clamped to its floor"),
    "temperature.adaptive.a0": num(zero="0: MACL's reference", negative="-1: a mean cosine may be negative",
                                   bad=["-1.5", "1.5"]),
    # ---- temperature ----
    "temperature.mode": choice(),
    "temperature.init": num(huge=FLAT_TAU),
    "temperature.objective": choice(),
    "temperature.parametrization": choice("exp"),
    "temperature.eps": num(huge="a floor only: a softplus / relu init must exceed it (bad row)",
                           bad=[("1.0", ["temperature.mode=learnable", "temperature.parametrization=softplus"])]),
    "temperature.tau_min": num(huge="a bound of the modes that read it, which refuse init below it (bad row)",
                               bad=[("0.5", ["temperature.mode=learnable", "temperature.tau_max=0.4"]),
                                    ("0.5", ["temperature.mode=learnable"])]),
    "temperature.tau_max": num(huge="a loose upper bound is no bound: legal",
                               bad=[("0.005", ["temperature.mode=learnable"])]),
    "temperature.lr_scale": num(huge="a fast τ: a divergence is stopped by the non-finite guard"),
    "temperature.hidden_dim": num(),
    "temperature.depth": num(),
    "temperature.detach_input": switch(),
    # ---- loss, data ----
    "loss.decoupled": switch(("true", ["temperature.mode=dro"])),
    "data.name": choice("mnist"),
    "data.root": free("a directory read by the dataset: a missing one is one error line then (CLI check below)"),
    "data.download": switch(),
    "data.val_root": free("read by the online kNN and the evaluations only: an error naming it there"),
    "data.channels": choice(),
    "data.image_size": num(bad=["7"]),
    "data.subset": num(huge="more than the data: all of them"),
    "data.pipeline": choice(),
    "data.num_workers": num(zero="0: loading in the training process"),
    "data.folder_cache_mb": num(zero="0: no imagefolder cache"),
    "data.cache_dir": free("a directory, created when the imagefolder cache is written"),
    "data.classes": free("class indices, checked against the class count", bad=["[3]", "[1, 1]", "[0, 10]", "[-1, 2]"],
                         ok=["[0, 1]"]),
    "data.synthetic_size": num(),
    "data.synthetic_classes": num(),
    "data.synthetic_image_size": num(bad=["4"]),
    "data.synthetic_noise": num(zero="0: noiseless class patterns", huge="noise that drowns the patterns: legal"),
    "data.sources": free("each source is checked as a data section", bad=[
        "abc", "[1]", ("[{name: synthetic, synthetic_size: 0, score: 1}]", ["data.name=mixture"]),
        ("[{name: synthetic, score: .nan}]", ["data.name=mixture"]),
        ("[{nme: synthetic, score: 1}]", ["data.name=mixture"]), ("[{name: synthetic, score: 1}]", [])],
        ok=["[]"]),
    # ---- augment ----
    "augment.crop_scale_min": num(ok={"1": "1: the whole image"}),
    "augment.flip_p": num(**PROB),
    "augment.jitter_strength": num(zero="0: no colour jitter", bad=["5.5"]),
    "augment.jitter_p": num(**PROB),
    "augment.grayscale_p": num(**PROB),
    "augment.blur_p": num(**PROB),
    "augment.solarize_p": num(**PROB),
    "augment.enabled": switch(),
    # ---- model ----
    "model.backbone": free("any timm name: an unknown one is one error line when the model is built (CLI check)"),
    "model.backbone_kwargs": free("checked before timm sees them (tests/test_model_file.py)", bad=["abc"],
                                  ok=["{depth: 1}"]),
    "model.small_stem": switch(),
    "model.stem_pool": switch(),
    "model.proj_hidden_dim": num(),
    "model.proj_dim": num(),
    "model.proj_layers": num(),
    "model.proj_bn": switch(),
    "model.proj_out_bn": choice(),
    "model.sync_bn": switch(),
    # ---- optim ----
    "optim.name": choice(),
    "optim.lr": num(huge="a diverging lr is stopped by the non-finite guard with the fix (test_divergence.py)"),
    "optim.lr_scaling": choice(),
    "optim.weight_decay": num(zero="0: no decay", huge="decays the weights to 0: legal, visible in the loss"),
    "optim.momentum": num(zero="0: plain SGD", bad=["1"]),
    "optim.betas": free("two coefficients", bad=["[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]", "[0.9, .nan]", "abc"],
                        ok=["[0.5, 0.9]"]),
    "optim.warmup_epochs": num(zero="0: no warm-up", huge=LONG),
    "optim.final_lr_ratio": num(zero="0: decay to 0", bad=["1.5"], ok={"1": "1: constant after the warm-up"}),
    "optim.grad_clip": num(huge="above every gradient norm it clips nothing: legal"),
    "optim.fused": switch(),
    # ---- moco ----
    "moco.momentum": num(zero="0: the key encoder copies the query encoder", bad=["1.5"]),
    "moco.momentum_cosine": switch(),
    "moco.queue_size": num(),
    "moco.symmetric": switch(),
    "moco.shuffle_bn": switch(),
    "moco.pred_hidden_dim": num(),
    # ---- train ----
    "train.method": choice("seed", ("mocov3", ["temperature.mode=dro"])),
    "train.epochs": num(huge=LONG),
    "train.max_steps": num(huge="more steps than the epochs give: the epochs end the run"),
    "train.batch_size": num(huge="larger than the data: refused once they are read (CLI check below)"),
    "train.grad_accum": num(bad=["3"]),  # 256 is not divisible by 3
    "train.mixed_precision": choice(),
    "train.seed": num(zero="0: a seed"),
    "train.log_every": num(huge="the end of every epoch is logged anyway"),
    "train.save_every_epochs": num(huge="the end of the run is saved anyway"),
    "train.save_every_steps": num(huge="the end of the run is saved anyway"),
    "train.keep_last": num(huge="keeps every checkpoint"),
    "train.output_dir": free("created if missing; a file or a directory not writable is refused when a run "
                             "starts (CLI checks below)"),
    "train.run_name": free("one directory name", bad=["../x", "/abs", "a/b", "..", "."], ok=["my-run"]),
    "train.deterministic": switch(),
    "train.progress": switch(),
    "train.channels_last": switch(),
    "train.compile": switch(),
    # ---- eval, wandb ----
    "eval.knn_k": free("neighbour counts", bad=["[0, 1]", "[]", "[-5, 20]", "[20]", "abc"], ok=["[1, 7]"]),
    "eval.knn_t": free("vote temperatures", bad=["[0, 0.1]", "[.nan, 0.1]", "[.inf, 0.1]", "[]"], ok=["[0.5, 2.0]"]),
    "eval.online_knn_every": num(zero="0: off", huge="never reached: off, as 0"),
    "eval.online_knn_subset": num(huge="more than the train set: all of it"),
    "eval.batch_size": num(huge="larger than the data: one batch"),
    "wandb.enabled": switch(),
    "wandb.project": free("a W&B name: W&B refuses a bad one and the run goes on offline"),
    "wandb.entity": free("a W&B name"),
    "wandb.mode": choice(),
    "wandb.group": free("a W&B name"),
    "wandb.tags": free("labels", ok=["[a, b]"]),
    # ---- distillation only ----
    "teacher.path": free("read when the teacher is loaded: one error line (tests/test_distill.py)", bad=["''"]),
    "teacher.model": free("ModelConfig fields, merged when a checkpoint teacher is loaded", bad=["abc"],
                          ok=["{backbone: resnet10t}"]),
    "teacher.probe": free("a teacher_probe.safetensors, read when the teacher is loaded"),
    "teacher.probe_iters": num(),
    "distill.queue_size": num(),
    "distill.alpha": num(zero="0: the KL term only", bad=["1.5"]),
    "distill.ctkd": switch("true"),  # needs kd and a bounded learnable T
    "distill.grl_lambda_min": num(zero="0: CTKD's start", bad=["2"]),  # above grl_lambda_max=1
    "distill.grl_lambda_max": num(zero="0 = the minimum: no reversal", huge="a strong reversal: legal"),
    "distill.grl_ramp_epochs": num(huge=LONG),
}
SAME_ROWS = {"teacher_temperature.": "temperature.", "data.mixture.schedule.": "temperature.schedule."}
DISTILL_ONLY = ("teacher.", "distill.", "teacher_temperature.")


def knobs(cls: type, prefix: str = "") -> Dict[str, type]:
    """Dotted key -> annotated type, for every leaf field of the dataclass ``cls`` (sections recursed into)."""
    out: Dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        section = inner[0] if typing.get_origin(t) is Union and dataclasses.is_dataclass(inner[0]) else t
        if dataclasses.is_dataclass(section):
            out.update(knobs(section, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


KNOBS = {**knobs(Config), **knobs(DistillConfig)}


def row_of(key: str) -> Row:
    for alias, base in SAME_ROWS.items():
        if key.startswith(alias):
            return ROWS[base + key[len(alias):]]
    return ROWS[key]


def _translate(overrides: Sequence[str], key: str) -> List[str]:
    for alias, base in SAME_ROWS.items():
        if key.startswith(alias):
            return [o.replace(base, alias, 1) if o.startswith(base) else o for o in overrides]
    return list(overrides)


def base_type(key: str) -> type:
    t = KNOBS[key]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) is Union else t


def cases(key: str) -> Tuple[List[Tuple[str, List[str]]], List[Tuple[str, str]]]:
    """(refused (value, context), accepted (value, why)) of a knob: its row's plus those of its type."""
    row, t = row_of(key), base_type(key)
    huge = "1000000000000" if t is int else "1e12"
    bad = [(v, []) if isinstance(v, str) else (v[0], list(v[1])) for v in row.bad]
    bad = [(huge if v == "HUGE" else v, _translate(ctx, key)) for v, ctx in bad]
    ok = [(huge if v == "HUGE" else v, why) for v, why in row.ok.items()]
    if t is float:
        bad += [(v, []) for v in ("nan", "inf", "-inf", "abc")]
    elif t is int:
        bad += [("abc", []), ("1.5", [])]
    if typing.get_origin(KNOBS[key]) is Union:
        ok.append(("null", "null: the default's meaning (schema.py)"))
    return bad, ok


def load(key: str, value: str, context: Sequence[str] = ()):
    overrides = [*context, f"{key}={value}"]
    if key.startswith(DISTILL_ONLY):
        return load_distill_config(None, ["teacher.path=runs/teacher", *overrides])
    return load_config(None, overrides)


def test_every_knob_has_a_row() -> None:
    missing = sorted(k for k in KNOBS if k not in ROWS and not k.startswith(tuple(SAME_ROWS)))
    unknown = sorted(k for k in ROWS if k not in KNOBS)
    assert not missing, f"knobs without a row (add one to ROWS): {missing}"
    assert not unknown, f"rows of no knob: {unknown}"
    for key in KNOBS:
        row, t = row_of(key), base_type(key)
        if row.kind == "num":
            assert t in (int, float), f"{key}: num() row for a {t}"
        if t in (int, float):  # a number decides zero, negative and huge
            assert row.kind == "num", f"{key}: a number needs a num() row"
        if t is bool:
            assert row.kind == "switch", f"{key}: a bool needs a switch() row"


BAD = [pytest.param(k, v, ctx, id=f"{k}={v}{'+' if ctx else ''}") for k in KNOBS for v, ctx in cases(k)[0]]
OK = [pytest.param(k, v, why, id=f"{k}={v}") for k in KNOBS for v, why in cases(k)[1]]


@pytest.mark.parametrize("key, value, context", BAD)
def test_a_bad_value_is_one_line_naming_the_key_and_the_override(key: str, value: str, context: List[str]) -> None:
    with pytest.raises(UserError) as exc:
        load(key, value, context)
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert key.split(".")[-1] in msg, msg  # the key (a relation names both of its keys)
    assert "override '" in msg, msg  # where the value came from
    # and what is accepted: a range, the choices, the type, or the rule between two keys
    assert re.search(r"must|accepted|lies outside|needs|applies to|is empty|could not be converted|not a valid|"
                     r"Incompatible|Cannot assign|not a ListConfig|not in '", msg), msg


@pytest.mark.parametrize("key, value, why", OK)
def test_a_value_accepted_on_purpose_loads(key: str, value: str, why: str) -> None:
    load(key, value)


# ---- what only a run can check: real command lines, exit 2 and one line ----------------------------------


def one_error_line(args: List[str]) -> str:
    proc = run_proc([sys.executable, "-m", "simclr_tau.cli", *args], ENV, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_bad_values_on_the_command_lines_exit_2_with_one_line(tmp_path: Path) -> None:
    out = f"train.output_dir={tmp_path / 'runs'}"
    line = one_error_line(["pretrain", TINY, out, "optim.grad_clip=-1"])
    assert line == "error: override 'optim.grad_clip=-1': optim.grad_clip=-1.0 must be > 0 or null"
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    line = one_error_line(["pretrain", str(listed)])
    assert line.startswith(f"error: config {listed}: the top level is a list; it must be a mapping of sections")
    afile = tmp_path / "afile"
    afile.write_text("")
    line = one_error_line(["pretrain", TINY, f"train.output_dir={afile}"])
    assert line.startswith(f"error: train.output_dir='{afile}': {afile} is a file, not a directory")
    line = one_error_line(["knn", "pixels", "--data", "synthetic", "--batch-size", "-4"])
    assert line == "error: --batch-size=-4 must be >= 1"
    line = one_error_line(["compare", str(tmp_path), "--out", str(afile)])
    assert line.startswith(f"error: --out='{afile}': {afile} is a file, not a directory")


def cli_error(capsys, *args: str) -> str:
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_is_refused(tmp_path: Path, capsys) -> None:
    err = cli_error(capsys, "pretrain", TINY, f"train.output_dir={tmp_path}", "train.mixed_precision=fp16")
    assert err.startswith("error: train.mixed_precision='fp16' needs a CUDA GPU")


def test_a_directory_that_cannot_be_written_is_refused(tmp_path: Path, capsys) -> None:
    if os.geteuid() != 0:  # mode bits bind a user ...
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    else:  # ... not root: /sys refuses new files to root too
        target = Path("/sys")
        with pytest.raises(OSError):
            (target / "simclr_tau_probe").touch()
    err = cli_error(capsys, "pretrain", TINY, f"train.output_dir={target / 'runs'}")
    assert err.startswith(f"error: train.output_dir='{target / 'runs'}': cannot write in {target}")
    err = cli_error(capsys, "knn", "pixels", "--data", "synthetic", "--out", str(target / "eval"))
    assert err.startswith(f"error: --out='{target / 'eval'}': cannot write in {target}")


@pytest.mark.parametrize("overrides, expected", [
    (["data.name=fashion_mnist", "data.root=MISSING"], "error: data.root=MISSING: no Fashion-MNIST idx files"),
    (["model.backbone=no_such_net"], "error: model.backbone='no_such_net' is not a timm model"),
    (["train.batch_size=1000000000000"], "error: train.batch_size=1000000000000 is larger than the dataset"),
], ids=["missing-root", "unknown-backbone", "batch-larger-than-data"])
def test_values_only_a_run_can_check_are_one_line(tmp_path: Path, capsys, overrides: List[str], expected: str) -> None:
    overrides = [o.replace("MISSING", str(tmp_path / "missing")) for o in overrides]
    err = cli_error(capsys, "pretrain", TINY, f"train.output_dir={tmp_path}", *overrides)
    assert err.startswith(expected.replace("MISSING", str(tmp_path / "missing"))), err


def test_a_full_disk_during_any_atomic_write_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """The checkpoint's own case (with its advice) is test_reliability's test_no_space_left_...; every other
    atomic write (encoder, eval JSON, feature cache) says the same in its words."""
    from simclr_tau.fileio import atomic_write

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "knn.json"
    with pytest.raises(UserError) as exc:
        atomic_write(target, full)
    assert str(exc.value) == (f"no space left on device while saving {target} (No space left on device); its previous "
                              "version, if any, is intact: free disk space and run again")
    assert not list(tmp_path.iterdir())  # no temporary file left

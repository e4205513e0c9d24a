"""A diverged state is never checkpointed (issue 18, item 5). A checkpoint is good only if every floating-point
tensor of its model is finite and within MAX_ABS (1e10; BatchNorm running statistics included) and its optimizer
state is finite; a save that would write another stops the run with one line naming the last good checkpoint and
what to change, and ``--resume`` never continues from a diverged checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.train.checkpoint import (MAX_ABS, checkpoint_problem, list_checkpoints, load_checkpoint,
                                         state_problem)
from simclr_tau.train.loop import stop_nonfinite
from simclr_tau.train.pretrain import run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
FIX = "Lower optim.lr (now {lr}), set optim.grad_clip (e.g. 1.0), or raise temperature.tau_min, then --resume auto"


def cli(tmp_path: Path, capsys, *args: str) -> str:
    """``simclr-tau pretrain TINY ...``: assert exit 2 and one ``error:`` line; return it."""
    from simclr_tau.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", TINY, f"train.output_dir={tmp_path}", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_state_problem_names_the_first_bad_tensor() -> None:
    good = {"w": torch.ones(3), "bn.running_var": torch.full((4,), 1e9), "steps": torch.tensor(10**12)}
    assert state_problem(good) is None  # integer tensors are not checked; 1e9 is within the bound
    assert state_problem({**good, "bn.running_var": torch.full((4,), 1.8e33)}) == \
        "bn.running_var reaches 1.8e+33 > 1e+10"
    assert state_problem({**good, "w": torch.tensor([1.0, float("nan")])}) == "w is not finite"
    assert state_problem({**good, "w": torch.tensor([float("-inf")])}) == "w is not finite"
    # a checkpoint: model bounded, optimizer only finite (Adam's squared-gradient average may be large)
    ckpt = {"model": good, "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1e20])}}, "param_groups": []}}
    assert checkpoint_problem(ckpt) is None
    ckpt["optimizer"]["state"][0]["exp_avg_sq"] = torch.tensor([float("nan")])
    assert checkpoint_problem(ckpt) == "optimizer.state.0.exp_avg_sq is not finite"
    assert MAX_ABS == 1e10


def test_exploding_batchnorm_statistics_stop_the_run_before_they_are_saved(tmp_path: Path, capsys) -> None:
    """lr 1e4: the loss stays finite (BatchNorm renormalises) while running_var explodes; the guard of old kept
    saving such checkpoints (running_var 4e14 at step 12) and exported the encoder."""
    line = cli(tmp_path, capsys, "train.run_name=bn", "optim.lr=1e4", "train.epochs=3", "train.save_every_steps=1",
               "train.keep_last=20")
    ckpts = tmp_path / "bn" / "checkpoints"
    m = re.match(r"error: diverged state after step (\d+) \((\S+) reaches (\S+) > 1e\+10\); the last good checkpoint "
                 r"(\S+) is kept\. " + re.escape(FIX.format(lr="10000")) + "$", line)
    assert m, line
    step, tensor, value, good = int(m.group(1)), m.group(2), float(m.group(3)), Path(m.group(4))
    assert tensor.endswith("running_var") and value > MAX_ABS
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{s:08d}.pt" for s in range(1, step)]
    assert good == ckpts / f"step_{step - 1:08d}.pt"
    for p in list_checkpoints(ckpts):  # every checkpoint left is good
        assert checkpoint_problem(load_checkpoint(p)) is None
    assert not (tmp_path / "bn" / "encoder.safetensors").exists()
    assert json.loads((tmp_path / "bn" / "summary.json").read_text())["error"] == f"diverged state after step {step}"


def test_weights_blown_up_by_the_first_update_leave_no_checkpoint(tmp_path: Path, capsys) -> None:
    """lr 1e30: step 1's loss is finite but its update makes the weights ~1e27; that is no 'last good' state."""
    line = cli(tmp_path, capsys, "train.run_name=big", "optim.lr=1e30", "train.save_every_steps=1")
    assert re.match(r"error: diverged state after step 1 \(\S+ reaches \S+ > 1e\+10\); no checkpoint was saved "
                    r"before it\. ", line), line
    assert line.endswith(FIX.format(lr="1e+30"))
    assert list_checkpoints(tmp_path / "big" / "checkpoints") == []


def test_a_running_var_blown_up_at_step_3_keeps_step_2_and_resume_auto_continues_from_it(tmp_path: Path, capsys,
                                                                                       monkeypatch) -> None:
    from simclr_tau.methods.simclr import SimCLR

    after_step = SimCLR.after_step

    def explode_at_step_3(self, step: int) -> None:
        after_step(self, step)
        if step == 2:  # 0-based: the 3rd step
            bn = next(m for m in self.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.mul_(1e30)

    with monkeypatch.context() as m:
        m.setattr(SimCLR, "after_step", explode_at_step_3)
        line = cli(tmp_path, capsys, "train.run_name=inj", "train.save_every_steps=1", "train.keep_last=10",
                   "optim.grad_clip=5")
    ckpts = tmp_path / "inj" / "checkpoints"
    assert line.startswith("error: diverged state after step 3 (encoder.conv1.1.running_var reaches "), line
    assert line.endswith(f"the last good checkpoint {ckpts / 'step_00000002.pt'} is kept. Lower optim.lr (now 0.1), "
                         "lower optim.grad_clip (now 5), or raise temperature.tau_min, then --resume auto"), line
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000001.pt", "step_00000002.pt"]
    capsys.readouterr()
    result = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=inj", "train.save_every_steps=1",
                                    "optim.grad_clip=5"]), resume="auto")
    assert f"resumed from {ckpts / 'step_00000002.pt'} at step 2" in capsys.readouterr().out
    assert result.step == 4 and checkpoint_problem(load_checkpoint(ckpts / "step_00000004.pt")) is None


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    return run(load_config(TINY, [f"train.output_dir={out}", "train.run_name=done", "train.save_every_steps=1",
                                  "train.keep_last=10"])).run_dir


def _diverge(path: Path) -> None:
    """Rewrite ``path`` as a checkpoint an older version could have kept: running_var 1.8e33."""
    state = load_checkpoint(path)
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key] = torch.full_like(state["model"][key], 1.8e33)
    torch.save(state, path)


def test_resume_auto_skips_a_diverged_checkpoint_and_an_explicit_one_is_refused(tmp_path: Path, finished: Path,
                                                                                capsys) -> None:
    run_dir = tmp_path / "done"
    shutil.copytree(finished, run_dir)
    ckpts = run_dir / "checkpoints"
    _diverge(ckpts / "step_00000004.pt")
    line = cli(tmp_path, capsys, "train.run_name=other", "--resume", str(ckpts / "step_00000004.pt"))
    assert line.startswith(f"error: --resume {ckpts / 'step_00000004.pt'}: this checkpoint has diverged (model.")
    assert "reaches 1.8e+33 > 1e+10); resume from an earlier one" in line
    with pytest.warns(UserWarning, match=r"skipping checkpoint: .*step_00000004\.pt has diverged \(model\.\S+ "
                                         r"reaches 1\.8e\+33 > 1e\+10\)"):
        result = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=done",
                                        "train.save_every_steps=1", "train.keep_last=10"]), resume="auto")
    assert f"resumed from {ckpts / 'step_00000003.pt'} at step 3" in capsys.readouterr().out
    assert result.step == 4 and checkpoint_problem(load_checkpoint(ckpts / "step_00000004.pt")) is None


def test_the_stop_message_names_the_newest_good_checkpoint_not_the_newest_file(tmp_path: Path, finished: Path) -> None:
    """A diverged checkpoint left on disk (by an older version) is not 'the last good one'."""

    class Record:
        def update_summary(self, values):
            self.summary = values

        def close(self):
            pass

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(finished / "checkpoints", ckpts)
    _diverge(ckpts / "step_00000004.pt")
    _diverge(ckpts / "step_00000003.pt")
    with pytest.raises(UserError) as exc:
        stop_nonfinite(Record(), 5, ckpts, fix="Lower optim.lr")
    assert str(exc.value) == (f"non-finite loss at step 5; the last good checkpoint {ckpts / 'step_00000002.pt'} is "
                              "kept. Lower optim.lr, then --resume auto")
    for p in list_checkpoints(ckpts)[:2]:
        _diverge(p)
    with pytest.raises(UserError) as exc:
        stop_nonfinite(Record(), 5, ckpts, fix="Lower optim.lr")
    assert str(exc.value) == (f"non-finite loss at step 5; no good checkpoint is left in {ckpts}. Lower optim.lr, "
                              "then --resume auto (it restarts from step 0)")

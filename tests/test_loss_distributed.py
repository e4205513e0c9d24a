"""Two real processes (gloo, CPU) with DistributedDataParallel give exactly the loss and gradients of one
process on the concatenated batch: global negatives with gradient (NT-Xent), global keys (MoCo v3),
scalar / per-anchor / learnable / conditional τ (the τ parameters' gradients included)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simclr_tau.distributed import all_gather_with_grad
from simclr_tau.losses import info_nce_in_batch, nt_xent
from simclr_tau.temperature import ConditionalTemperature, LearnableTemperature

pytestmark = pytest.mark.slow

WORLD = 2
N_LOCAL = 3  # pairs per process
N_GLOBAL = WORLD * N_LOCAL
D_IN, D_OUT = 6, 4
CASES = ("scalar", "per_anchor", "learnable", "conditional", "in_batch_scalar", "in_batch_learnable")


class Net(nn.Module):
    """A BatchNorm-free encoder and, for learnable / conditional cases, the τ module inside the DDP module
    (so DDP averages the τ gradients too)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical initialization in every process and in the reference
        self.encoder = nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, D_OUT))
        self.temperature: nn.Module | None = None
        if case.endswith("learnable"):
            self.temperature = LearnableTemperature(0.1, "log", tau_min=0.01, tau_max=1.0)
        elif case == "conditional":
            self.temperature = ConditionalTemperature(D_OUT, init=0.2, tau_min=0.05, tau_max=1.0, hidden_dim=5)
            with torch.no_grad():  # leave the constant-τ start so that every head parameter gets a gradient
                for p in self.temperature.parameters():
                    p.copy_(torch.randn(p.shape))
        self.keys_without_grad = case.startswith("in_batch")
        # float64 end to end: the two runs differ only in summation order, ~1e-16 here, so rtol 1e-5
        # leaves no room for flakiness while any real discrepancy (a wrong index, a missing gradient
        # path, a wrong scale) is of order 1e-2 or more. (In float32, that noise reaches ~1e-6.)
        self.double()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        z1 = self.encoder(x1)
        if self.keys_without_grad:  # MoCo v3: keys from a (here: the same, m = 0) encoder, no gradient
            with torch.no_grad():
                z2 = self.encoder(x2)
        else:
            z2 = self.encoder(x2)
        tau = self.temperature(torch.cat([z1, z2])) if self.temperature is not None else None
        return z1, z2, tau


def global_batch():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(N_GLOBAL, D_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(N_GLOBAL, D_IN, generator=g, dtype=torch.float64)
    tau_per_anchor = 0.05 + 0.3 * torch.rand(2 * N_GLOBAL, generator=g, dtype=torch.float64)  # for [z1_all; z2_all]
    return x1, x2, tau_per_anchor


def loss_of(case: str, model: nn.Module, x1, x2, tau_per_anchor, gather: bool = True) -> torch.Tensor:
    z1, z2, tau = model(x1, x2)
    if case == "scalar":
        return nt_xent(z1, z2, 0.1, gather=gather)
    if case == "per_anchor":
        return nt_xent(z1, z2, tau_per_anchor, gather=gather)
    if case in ("learnable", "conditional"):
        return nt_xent(z1, z2, tau, gather=gather)
    return info_nce_in_batch(z1, z2, 0.2 if case == "in_batch_scalar" else tau, gather=gather)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        x1, x2, tau_all = global_batch()
        mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        # This process's anchors are [z1_mine; z2_mine]: take their τ from both halves of the global order.
        tau_mine = torch.cat([tau_all[:N_GLOBAL][mine], tau_all[N_GLOBAL:][mine]])
        results = {}
        for case in CASES:
            model = DistributedDataParallel(Net(case))
            loss = loss_of(case, model, x1[mine], x2[mine], tau_mine)
            loss.backward()  # DDP averages gradients over the processes
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[case] = {
                "loss": mean_loss / world,
                "grads": {name: p.grad.clone() for name, p in model.module.named_parameters()},
            }
        # Negative control: the same loss with local negatives only is a different number.
        local = loss_of("scalar", Net("scalar"), x1[mine], x2[mine], tau_mine, gather=False).detach()
        dist.all_reduce(local)
        results["local_only_scalar_loss"] = local / world
        # all_gather_with_grad itself: loss = Σ w ⊙ gather(x) on every rank, so dloss/dx_r = world · w[r's rows],
        # and the gradient a hook on the gathered tensor saw must stay w, not become the all-reduced sum.
        x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        w = torch.arange(WORLD * 6, dtype=torch.float64).view(WORLD * 2, 3)
        gathered = all_gather_with_grad(x)
        seen = []
        gathered.register_hook(seen.append)  # keeps the very tensor autograd hands on to the backward
        (gathered * w).sum().backward()
        results["gather"] = {"value": gathered.detach(), "x_grad": x.grad, "gathered_grad": seen[0]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def reference(case: str):
    """One process, the whole batch, no torch.distributed."""
    x1, x2, tau_all = global_batch()
    model = Net(case)
    loss = loss_of(case, model, x1, x2, tau_all)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_on_the_whole_batch(distributed_results, case):
    loss, grads = reference(case)
    for rank, results in enumerate(distributed_results):
        got = results[case]
        torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-12)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            assert grad.abs().max() > 1e-6, f"{case}: {name} has no gradient in the reference"
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-12, msg=lambda m: f"rank {rank} {case} {name}: {m}")
    if case.endswith("learnable"):
        assert "temperature.theta" in grads  # the τ parameter's gradient is part of the comparison


def test_global_negatives_matter(distributed_results):
    """The comparison above has teeth: with local negatives only, the loss is measurably different."""
    loss, _ = reference("scalar")
    local = distributed_results[0]["local_only_scalar_loss"]
    assert abs(float(local) - float(loss)) > 1e-2


def test_all_gather_with_grad_values_gradients_and_untouched_upstream_gradient(distributed_results):
    w = torch.arange(WORLD * 6, dtype=torch.float64).view(WORLD * 2, 3)
    for rank, results in enumerate(distributed_results):
        g = results["gather"]
        torch.testing.assert_close(g["value"], torch.cat([torch.full((2, 3), float(r + 1), dtype=torch.float64)
                                                          for r in range(WORLD)]), rtol=0, atol=0)  # rank order
        torch.testing.assert_close(g["x_grad"], WORLD * w[rank * 2:(rank + 1) * 2], rtol=0, atol=0)
        torch.testing.assert_close(g["gathered_grad"], w, rtol=0, atol=0)

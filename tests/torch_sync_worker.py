"""One rank of the ``fastnorm.torch.SyncBatchNorm`` tests (started by tests/test_torch_sync.py).

Each rank joins a gloo group through a file, runs a scenario and writes
``rank<r>.json`` to the output directory: ``{"ok": bool, "failures": [...],
"error": str | None, "seconds": float}``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

#: Samples per rank: uneven, one rank empty (the issue's 3, 5, 0, 8).
BATCHES = {1: [6], 2: [3, 5], 4: [3, 5, 0, 8]}
#: (spatial shape, channels, memory format) of the equality scenario.
GEOMETRIES = [
    ((), 5, None),
    ((7,), 4, None),
    ((4, 5), 6, None),
    ((4, 5), 6, torch.channels_last),
    ((2, 3, 4), 3, None),
    ((2, 3, 4), 3, torch.channels_last_3d),
]


def _slice(world, rank):
    sizes = BATCHES[world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), sum(sizes)


def _gather_bytes(*tensors):
    """Every rank's bytes of ``tensors``, for the bitwise comparison across ranks."""
    mine = b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _check_equal(world, rank, dtype, failures):
    from fastnorm.torch import SyncBatchNorm

    part, total = _slice(world, rank)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for spatial, channels, memory_format in GEOMETRIES:
        name = f"{dtype} spatial={spatial} C={channels} {memory_format}"
        gen = torch.Generator().manual_seed(1234)
        x = (torch.randn(total, channels, *spatial, generator=gen, dtype=torch.float64) * 3 + 50).to(dtype)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        weight = torch.randn(channels, generator=gen, dtype=torch.float64)
        bias = torch.randn(channels, generator=gen, dtype=torch.float64)
        # reference: torch on the whole batch, float64, one process
        xr = x.to(torch.float64).clone().requires_grad_()
        wr, br = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        rm_ref, rv_ref = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
        yr = torch.nn.functional.batch_norm(xr, rm_ref, rv_ref, wr, br, True, 0.1, 1e-5)
        yr.backward(dy.to(torch.float64))
        # this rank's part through SyncBatchNorm
        bn = SyncBatchNorm(channels, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        xs = x[part].clone()
        if memory_format is not None:
            xs = xs.contiguous(memory_format=memory_format)
        xs.requires_grad_()
        y = bn(xs)
        y.backward(dy[part])
        if memory_format is not None and y.numel() and not y.is_contiguous(memory_format=memory_format):
            failures.append(f"{name}: the output lost the input's memory format")
        checks = [
            ("y", y, yr[part]),
            ("dx", xs.grad, xr.grad[part]),
            ("running_mean", bn.running_mean, rm_ref),
            ("running_var", bn.running_var, rv_ref),
        ]
        # the parameters' gradients are each rank's share: their sum is the whole batch's
        grads = torch.stack([bn.weight.grad.to(torch.float64), bn.bias.grad.to(torch.float64)])
        dist.all_reduce(grads)
        checks += [
            ("dweight (sum over ranks)", grads[0], wr.grad),
            ("dbias (sum over ranks)", grads[1], br.grad),
        ]
        for what, got, want in checks:
            got, want = got.detach().to(torch.float64), want.detach()
            scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
            err = float((got - want).abs().max()) / scale if want.numel() else 0.0
            if not err <= tol:
                failures.append(
                    f"{name}: {what} differs from torch's one-process result by {err:.3g} > {tol}"
                )
        everyone = _gather_bytes(bn.running_mean, bn.running_var)
        if any(b != everyone[0] for b in everyone):
            failures.append(f"{name}: the running statistics differ between ranks")


def _check_ddp(rank, failures):
    """One step of a small model in DistributedDataParallel: every rank ends with the same weights."""
    from fastnorm.torch import convert_sync_batchnorm

    # DDP gets a group of its own.  torch 2.13's DDP keeps its process group
    # alive after destroy_process_group: if that group's gloo thread frees the
    # work of a Python-owned tensor while the interpreter exits, the process
    # aborts ("terminate called without an active exception",
    # pytorch/pytorch#179291).  Here the last collective (the gather below) is
    # on the default group, which destroy_process_group does tear down.
    group = dist.new_group(backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    model = convert_sync_batchnorm(model, group)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.randn(4 + rank, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()
    opt.step()
    everyone = _gather_bytes(*model.parameters(), model[1].running_mean)
    if any(b != everyone[0] for b in everyone):
        failures.append("DDP: the parameters differ between ranks after a step")


def main():
    scenario, init_file, world, rank, out_dir = sys.argv[1:6]
    world, rank = int(world), int(rank)
    start = time.perf_counter()
    result = {"ok": False, "failures": [], "error": None}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(seconds=60),
        )
        from fastnorm.torch import SyncBatchNorm

        if scenario == "equal":
            for dtype in (torch.float64, torch.float32):
                _check_equal(world, rank, dtype, result["failures"])
            _check_ddp(rank, result["failures"])
        else:
            channels = 4 + (scenario == "mismatch" and rank == 1)
            bn = SyncBatchNorm(channels)
            x = torch.randn(3, channels, 5, 5)
            if scenario == "raise" and rank == 1:
                raise RuntimeError("rank 1 fails before its forward pass")
            if scenario == "kill" and rank == 2:
                os._exit(3)
            bn(x).sum().backward()
        result["ok"] = not result["failures"]
    except BaseException as exc:  # recorded for the test, which checks every rank's outcome
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    if scenario == "raise" and rank == 1:
        os._exit(1)  # a rank that raised dies: the others must not wait for it
    # no destroy_process_group after a failure: a peer may be gone
    if result["error"] is None and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

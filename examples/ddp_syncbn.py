"""Train the digits CNN data-parallel over gloo processes with fastnorm's SyncBatchNorm.

Three runs of the network of ``train_digits.py``, from the same weights, on the same
sequence of global batches of ``16`` images:

1. **one process**, batch 16, fastnorm's BatchNorm;
2. **DistributedDataParallel over ``--world`` processes** (8 images each for 2),
   ``fastnorm.torch.SyncBatchNorm``: every rank normalizes with the statistics of the
   whole global batch, so the run computes what run 1 computes, up to rounding;
3. the same processes with plain per-process BatchNorm: each rank normalizes with its
   own 8 images' statistics, another computation.

The script prints, per run, the test accuracy, the median time of a training step, and
the largest difference of its weights from run 1's after the first step and after
training. The first is rounding alone; SGD then amplifies it, by how much depends on the
CPU (torch's convolutions round differently for another batch size or thread count)::

    python examples/ddp_syncbn.py                  # 2 processes, 5 epochs
    python examples/ddp_syncbn.py --world 4 --json

Each process runs one thread (``torch.set_num_threads(1)``, ``NUMBA_NUM_THREADS=1``);
the one-process run uses ``--world`` threads (at most one per core).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import digits, make_model  # noqa: E402

import fastnorm.torch as fnt  # noqa: E402

GLOBAL_BATCH = 16


def _batches(count, epochs, seed):
    """Yield the global batches of every epoch: the same index sequence for every run."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - GLOBAL_BATCH + 1, GLOBAL_BATCH):
            yield order[start : start + GLOBAL_BATCH]


def _weights(model):
    """NumPy copies of the parameters (tensors would travel as shared memory this process owns)."""
    return [p.detach().numpy().copy() for p in model.parameters()]


def _train(model, data, epochs, seed, rank=0, world=1):
    """Train with SGD + momentum on this rank's share of each global batch.

    Returns the step times and the weights after the first step.
    """
    x_train, y_train, _, _ = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    share = GLOBAL_BATCH // world
    times = []
    first = None
    model.train()
    for index in _batches(len(y_train), epochs, seed):
        mine = index[rank * share : (rank + 1) * share]
        begin = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[mine]), y_train[mine]).backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
        if first is None:
            first = _weights(model)  # a DDP wrapper yields its module's parameters
    return times, first


def _evaluate(model, data):
    _, _, x_test, y_test = data
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


def _rank(rank, world, init_file, sync, epochs, seed, results):
    """One process of a data-parallel run; rank 0 puts ``(accuracy, step times, weights)`` in ``results``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = digits(seed)
        model = fnt.convert(make_model("batch", seed))
        if sync:
            model = fnt.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        times, first = _train(ddp, data, epochs, seed, rank, world)
        if rank == 0:
            results.put((_evaluate(model, data), times, first, _weights(model)))
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def _parallel_run(world, sync, epochs, seed):
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    # one Numba thread per process: read when the spawned process imports Numba
    previous = os.environ.get("NUMBA_NUM_THREADS")
    os.environ["NUMBA_NUM_THREADS"] = "1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            processes = mp.start_processes(
                _rank,
                args=(world, os.path.join(tmp, "init"), sync, epochs, seed, results),
                nprocs=world,
                start_method="spawn",
                join=False,
            )
            # read before joining: rank 0 blocks in put() until the pipe is read
            result = results.get()
            while not processes.join():
                pass
    finally:
        if previous is None:
            del os.environ["NUMBA_NUM_THREADS"]
        else:
            os.environ["NUMBA_NUM_THREADS"] = previous
    return result


def _max_difference(weights, reference):
    return max(float(abs(a - b).max()) for a, b in zip(weights, reference, strict=True))


def compare(world=2, epochs=5, seed=0):
    """Run the three trainings; return a dict of results (accuracies in %, step times in ms)."""
    torch.set_num_threads(min(world, os.cpu_count() or 1))
    data = digits(seed)
    reference = fnt.convert(make_model("batch", seed))
    model = copy.deepcopy(reference)
    times, first = _train(model, data, epochs, seed)
    one = (_evaluate(model, data), times, first, _weights(model))
    runs = {"one process": one}
    runs["SyncBatchNorm"] = _parallel_run(world, True, epochs, seed)
    runs["per-process BatchNorm"] = _parallel_run(world, False, epochs, seed)
    rows = {}
    for name, (accuracy, step_times, first, weights) in runs.items():
        rows[name] = {
            "accuracy": accuracy,
            "step_ms": statistics.median(step_times) * 1e3,
            "max_weight_difference_first_step": _max_difference(first, one[2]),
            "max_weight_difference": _max_difference(weights, one[3]),
        }
    return {"world": world, "epochs": epochs, "seed": seed, "runs": rows}


def main(argv=None):
    """Run :func:`compare` and print a table (or one JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes (a divisor of 16)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if GLOBAL_BATCH % args.world:
        parser.error(f"--world must divide the global batch of {GLOBAL_BATCH}")
    result = compare(args.world, args.epochs, args.seed)
    if args.json:
        print(json.dumps(result))
        return
    share = GLOBAL_BATCH // args.world
    print(f"digits CNN, global batch {GLOBAL_BATCH}, {args.epochs} epochs, {args.world} processes x {share}")
    print(f"{'run':24s} {'accuracy':>9s} {'step':>9s}  max |w - w_one process|: first step, end")
    for name, row in result["runs"].items():
        print(
            f"{name:24s} {row['accuracy']:8.2f}% {row['step_ms']:6.2f} ms  "
            f"{row['max_weight_difference_first_step']:.2e}  {row['max_weight_difference']:.2e}"
        )


if __name__ == "__main__":
    main()

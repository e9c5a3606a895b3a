"""``fastnorm.torch.SyncBatchNorm`` over real gloo process groups on localhost.

Each test starts ``world`` processes of ``tests/torch_sync_worker.py`` that
join one group through a temporary file; every rank reports its outcome in a
JSON file.  Equality: uneven per-rank batches (3, 5, 0, 8 samples) against
torch's one-process BatchNorm of the whole batch, float64 to 1e-12 and
float32 to 2e-5, NCHW and channels-last, 1-D/2-D/3-D, the running statistics
bitwise the same on every rank, and a DistributedDataParallel step.  Faults: a
rank that raises, a rank killed, a rank with other channels; every rank must
end with an error, never hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

WORKER = Path(__file__).with_name("torch_sync_worker.py")
#: Seconds a whole scenario may take; gloo's own timeout in the worker is 60 s.
DEADLINE = 600


def _run(scenario, world, tmp_path):
    """Run ``world`` ranks of ``scenario``; return ``(results by rank, seconds)``."""
    init_file = tmp_path / "init"
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(init_file), str(world), str(rank), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1.0, DEADLINE - (time.perf_counter() - start)))[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    seconds = time.perf_counter() - start
    results = {}
    for rank in range(world):
        path = tmp_path / f"rank{rank}.json"
        if path.exists():
            results[rank] = json.loads(path.read_text())
    log = b"\n".join(outputs).decode(errors="replace")[-4000:]
    return results, seconds, [p.returncode for p in processes], log


@pytest.mark.parametrize("world", [2, 4])
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(world, tmp_path):
    results, _, codes, log = _run("equal", world, tmp_path)
    assert sorted(results) == list(range(world)), log
    for rank, result in results.items():
        assert result["error"] is None, (rank, result.get("traceback"), log)
        assert result["ok"], (rank, result["failures"])
    assert codes == [0] * world, log


def test_a_rank_that_raises_fails_every_other_rank(tmp_path):
    results, seconds, _, log = _run("raise", 4, tmp_path)
    assert sorted(results) == [0, 1, 2, 3], log
    assert "rank 1 fails" in results[1]["error"]
    for rank in (0, 2, 3):
        assert results[rank]["error"] is not None, (rank, results[rank], log)
    assert seconds < 120, seconds


def test_a_killed_rank_fails_every_other_rank(tmp_path):
    results, seconds, codes, log = _run("kill", 4, tmp_path)
    assert codes[2] == 3, log
    assert 2 not in results
    for rank in (0, 1, 3):
        assert results[rank]["error"] is not None, (rank, results[rank], log)
    assert seconds < 120, seconds


def test_mismatched_channels_raise_the_same_error_on_every_rank(tmp_path):
    results, _, _, log = _run("mismatch", 2, tmp_path)
    assert sorted(results) == [0, 1], log
    errors = {result["error"] for result in results.values()}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith("ValueError") and "rank 0: C=4" in error and "rank 1: C=5" in error, error


# ---------------------------------------------------------------------------
# In this process: no process group (the one-process pass), conversion
# ---------------------------------------------------------------------------


def test_without_a_process_group_it_is_batch_norm():
    """Not initialized (or in eval): fastnorm's BatchNorm2d pass, running statistics included."""
    import fastnorm.torch as fnt

    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    sync, plain = fnt.SyncBatchNorm(3, momentum=None, dtype=torch.float64), fnt.BatchNorm2d(3, momentum=None)
    plain = plain.double()
    for module in (sync, plain):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 3))
    for _ in range(2):
        assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_mean, plain.running_mean)
    assert torch.equal(sync.running_var, plain.running_var)
    assert int(sync.num_batches_tracked) == int(plain.num_batches_tracked) == 2
    sync.eval()
    plain.eval()
    assert torch.equal(sync(x), plain(x))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(3))


def test_convert_sync_batchnorm_shares_the_tensors_of_torch_and_fastnorm_modules():
    import fastnorm.torch as fnt

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        fnt.BatchNorm2d(4, activation="relu"),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False, momentum=None)),
        torch.nn.GroupNorm(2, 4),
    )
    model[2].eval()
    before = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fnt.convert_sync_batchnorm(model)
    assert converted is model
    assert [type(m).__name__ for m in model[1:4]] == ["SyncBatchNorm", "SyncBatchNorm", "Sequential"]
    assert type(model[3][0]) is fnt.SyncBatchNorm and type(model[4]) is torch.nn.GroupNorm
    assert model[2].activation == "relu" and not model[2].training and model[1].training
    assert model[3][0].momentum is None and model[3][0].weight is None
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a single module converts to a new one
    single = fnt.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert type(single) is fnt.SyncBatchNorm and single.num_features == 2
    # torch's own SyncBatchNorm converts too, by fnt.convert as well
    assert type(fnt.convert(torch.nn.SyncBatchNorm(2))) is fnt.SyncBatchNorm

"""With torch loaded, the kernels run on torch's own OpenMP threads (``_threading.share_torch_openmp``).

Each case runs in a fresh process, because the threading layer is chosen once
per process.  Checked: the layer and what ``show_config`` says, that no second
pool of threads appears beside torch's, that torch's thread count is the same
before and after, that concurrent callers get the same bits, that an explicit
``NUMBA_THREADING_LAYER`` wins, and that a process forked from one sharing the
runtime gets bitwise the parent's results from the serial builds (the
forked-children machinery is tested for every layer in ``tests/test_fork.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.jit, pytest.mark.torch]

#: The probe: imports in the order given by argv[1], runs torch and fastnorm with 2 threads
#: (torch's count set by argv[2] first), forks a child that recomputes, prints a JSON report.
PROBE = textwrap.dedent(
    """
    import hashlib, json, os, sys, warnings
    order, torch_threads = sys.argv[1], int(sys.argv[2])

    def tasks():
        return len(os.listdir("/proc/self/task"))

    if order == "torch-first":
        import torch
        torch.set_num_threads(torch_threads)
        import fastnorm
    elif order == "torch-first-then-fastnorm.torch":  # shared at import of fastnorm, kept
        import torch
        torch.set_num_threads(torch_threads)
        import fastnorm
        import fastnorm.torch
    elif order == "torch-after-fastnorm":  # torch imported before the first kernel ran
        import fastnorm
        import torch
        torch.set_num_threads(torch_threads)
    else:  # fastnorm first, then fastnorm.torch before any kernel ran
        import fastnorm
        import torch
        torch.set_num_threads(torch_threads)
        import fastnorm.torch
    import numba
    import numpy as np

    x = np.random.default_rng(0).standard_normal((64, 64, 16, 16)).astype(np.float32)
    a = torch.randn(512, 512)
    torch.set_num_threads(2)
    for _ in range(3):
        a @ a  # torch's OpenMP team of 2 exists from here on
    with_torch = tasks()
    y = fastnorm.group_norm(x, 8)
    after_fastnorm = tasks()
    torch.set_num_threads(torch_threads)
    import threading  # concurrent callers: each Python thread launches its own OpenMP team
    concurrent = []
    def work():
        concurrent.extend(np.array_equal(fastnorm.group_norm(x, 8), y) for _ in range(10))
    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    report = {
        "layer": numba.threading_layer(),
        "threading": fastnorm.show_config(as_dict=True)["threading"],
        "tasks": [with_torch, after_fastnorm],
        "torch_threads": torch.get_num_threads(),
        "digest": hashlib.sha256(y.tobytes()).hexdigest(),
        "concurrent": concurrent,
    }
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            child = fastnorm.group_norm(x, 8)
        os.write(write, json.dumps({
            "digest": hashlib.sha256(child.tobytes()).hexdigest(),
            "serial_after_fork": fastnorm.show_config(as_dict=True)["threading"]["serial_after_fork"],
            "warnings": [str(w.message) for w in caught],
        }).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report["child"] = json.loads(pipe.read())
    report["child_status"] = os.waitpid(pid, 0)[1]
    print(json.dumps(report))
    """
)


def run_probe(order, torch_threads, layer=None):
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    result = subprocess.run(
        [sys.executable, "-c", PROBE, order, str(torch_threads)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "order",
    [
        "torch-first",
        "torch-first-then-fastnorm.torch",
        "torch-after-fastnorm",
        "fastnorm.torch-before-the-first-call",
    ],
)
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_the_kernels_run_on_torchs_openmp_threads(order, torch_threads):
    report = run_probe(order, torch_threads)
    threading = report["threading"]
    assert report["layer"] == "omp" and threading["active"]
    assert threading["torch_openmp"].startswith("shared with torch: ")
    assert "torch" in threading["torch_openmp"] and "libgomp" in threading["torch_openmp"]
    assert threading["fork_safe"] is False
    # fastnorm's 2-thread parallel region adds no thread to torch's team of 2.
    with_torch, after_fastnorm = report["tasks"]
    assert after_fastnorm == with_torch, report["tasks"]
    # Starting Numba's OpenMP layer sets the runtime's thread count; torch's is put back.
    assert report["torch_threads"] == torch_threads
    # 4 Python threads calling at once get the serial call's bits, 40 times.
    assert report["concurrent"] == [True] * 40


def test_a_forked_child_runs_the_serial_builds_with_the_parents_bits():
    """torch's count decides the warning: 2 threads in the child warn once, 1 (a DataLoader worker) never."""
    for torch_threads, warned in ((2, True), (1, False)):
        report = run_probe("torch-first", torch_threads)
        child = report["child"]
        assert report["child_status"] == 0, report
        assert child["digest"] == report["digest"]
        assert child["serial_after_fork"] is True
        messages = [m for m in child["warnings"] if "single-threaded" in m]
        assert len(messages) == (1 if warned else 0), child["warnings"]
        if warned:
            assert "NUMBA_THREADING_LAYER=tbb" in messages[0]


def test_an_explicit_threading_layer_wins():
    report = run_probe("torch-first", 2, layer="tbb")
    assert report["layer"] == "tbb"
    assert report["threading"]["torch_openmp"] == "not shared: NUMBA_THREADING_LAYER='tbb'"
    assert report["child"]["digest"] == report["digest"] and report["child"]["serial_after_fork"] is False
    assert report["tasks"][1] > report["tasks"][0]  # TBB's own workers, beside torch's team


def test_torch_imported_after_the_first_kernel_is_not_shared():
    """Once Numba's pool runs (here TBB or OpenMP of its own), it is kept, and show_config says why."""
    probe = (
        "import fastnorm, numpy as np, numba\n"
        "fastnorm.layer_norm(np.ones((64, 768), np.float32), 768)\n"
        "layer = numba.threading_layer()\n"
        "import torch\n"
        "fastnorm.layer_norm(np.ones((32, 512), np.float32), 512)\n"
        "import fastnorm.torch\n"
        "assert numba.threading_layer() == layer, layer\n"
        "print(fastnorm.show_config(as_dict=True)['threading']['torch_openmp'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("not shared: Numba's pool had already started"), result.stdout


def test_without_torch_nothing_is_shared():
    probe = (
        "import sys, fastnorm; from fastnorm import _threading\n"
        "assert 'torch' not in sys.modules\n"
        "print(_threading.OPENMP_STATUS)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "not shared: torch was not imported"

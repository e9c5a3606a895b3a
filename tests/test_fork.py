"""Fork safety: a process forked after fastnorm ran gets bitwise the parent's results.

The parent computes first (so Numba's thread pool runs), then forks; the child
computes the same calls, and runs the calls the parent prepared
(``fastnorm.prepare``, which hold the parent's plans), and sends a SHA-256 of
every output through a pipe.
Covered: ``os.fork``, ``multiprocessing`` with the ``fork`` start method and a
PyTorch DataLoader with two workers, in this process (the default install's
layer: TBB with the ``tbb`` package, see ``fastnorm/_threading.py``) and in
subprocesses with ``NUMBA_THREADING_LAYER`` forced to ``omp`` (GNU OpenMP,
whose parallel regions kill a forked child: fastnorm runs the serial builds
there and warns once, unless torch runs one thread there, as in a DataLoader
worker) and to ``workqueue``.  A process that imports torch shares torch's
OpenMP runtime (``tests/test_torch_openmp.py``).  The C ABI's fork test is in
``tests/test_capi.py``.

Run as a script (``python tests/test_fork.py SCENARIO...``), this module runs
the scenarios in a fresh process and prints their reports as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import _threading

pytestmark = pytest.mark.jit  # forks of compiled, multithreaded kernels

#: Seconds a child may take (a cold Numba cache compiles the serial builds in it).
CHILD_TIMEOUT = 600

#: (spec, logical shape, dtype): every kernel family (planes, channels-last, rows), both dtypes;
#: every tensor is above the 16384 elements under which the serial builds run anyway.  The
#: channels-last InstanceNorm has 16 samples: with 2 to 4 threads its training passes take the
#: fused schedule chosen for the thread count, which a serial child then runs single-threaded.
CASES = [
    (fastnorm.NormSpec.group_norm(8), (8, 32, 16, 16), np.float32),
    (fastnorm.NormSpec.batch_norm(channels_last=True), (4, 16, 16, 32), np.float64),
    (fastnorm.NormSpec.layer_norm(1), (64, 512), np.float32),
    (fastnorm.NormSpec.instance_norm(channels_last=True), (16, 8, 8, 32), np.float32),
]

HERE = Path(__file__).resolve().parent


def _tbb_installed():
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _inputs(index):
    spec, shape, dtype = CASES[index]
    rng = np.random.default_rng(index)
    channels = shape[-1] if spec.channels_last else shape[1]
    pshape = shape[-spec.normalized_ndim :] if spec.kind == "layer_norm" else (channels,)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(pshape)).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype)
    return spec, x, dy, w, b


#: Prepared calls (``fastnorm.prepare``) of each case, made on first use: by the parent,
#: before it forks, so that a child runs calls prepared (planned) in its parent.
_PREPARED: dict = {}


def _prepared_outputs(index):
    """The outputs of ``CASES[index]``'s three passes through prepared calls."""
    if index not in _PREPARED:
        spec, x, dy, w, b = _inputs(index)
        forward = fastnorm.prepare(fastnorm.forward, x, spec, w, b)
        _, stats = forward()
        inference = fastnorm.prepare(fastnorm.forward_inference, x, stats, spec, w, b)
        _PREPARED[index] = (forward, inference, fastnorm.prepare(fastnorm.backward, dy, x, stats, spec, w))
    forward, inference, backward = _PREPARED[index]
    y, stats = forward()
    return (y, stats.mean, stats.rstd, inference(), *backward())


def case_digest(index):
    """SHA-256 of every output of the forward, inference and backward passes of ``CASES[index]``.

    Each pass runs twice: called, and through the prepared call of :func:`_prepared_outputs`.
    """
    spec, x, dy, w, b = _inputs(index)
    y, stats = fastnorm.forward(x, spec, w, b)
    y_inf = fastnorm.forward_inference(x, stats, spec, w, b)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    digest = hashlib.sha256()
    for array in (y, stats.mean, stats.rstd, y_inf, dx, dw, db, *_prepared_outputs(index)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def digests():
    return [case_digest(i) for i in range(len(CASES))]


def child_report():
    """What a child sends back: its digests, the RuntimeWarnings it raised, its fallback state."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = digests()
    return {
        "pid": os.getpid(),
        "digests": result,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "serial_after_fork": _threading.serial_after_fork(),
        "layer": numba.threading_layer(),
        # torch on one thread here (its fork handler, or a DataLoader worker): no serial-builds warning
        "torch_one_thread": "torch" in sys.modules and sys.modules["torch"].get_num_threads() == 1,
    }


@contextlib.contextmanager
def _forking():
    """Python 3.12+ warns (DeprecationWarning) on a fork of a process with threads: TBB's or OpenMP's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _wait(pid, deadline):
    """Exit code of child ``pid`` (``-signal`` if killed); kills it at ``deadline``."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def run_os_fork():
    """Parent computes, ``os.fork()``, the child computes: ``{"parent", "child", "exitcode"}``."""
    parent = digests()
    read_end, write_end = os.pipe()
    with _forking():
        pid = os.fork()
    if pid == 0:  # child: never return into the caller (pytest)
        code = 1
        try:
            os.close(read_end)
            try:
                message = child_report()
            except BaseException:
                message = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(message).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + CHILD_TIMEOUT
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    exitcode = _wait(pid, deadline)
    child = json.loads(b"".join(chunks)) if chunks else None
    return {"parent": parent, "child": child, "exitcode": exitcode}


def _mp_child(conn):
    try:
        conn.send(child_report())
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_multiprocessing_fork():
    """The same with ``multiprocessing.get_context("fork").Process``."""
    parent = digests()
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_mp_child, args=(sender,))
    with _forking():
        process.start()
    sender.close()
    child = None
    if receiver.poll(CHILD_TIMEOUT):
        with contextlib.suppress(EOFError):  # the child died without sending
            child = receiver.recv()
    process.join(CHILD_TIMEOUT if child is not None else 1)
    if process.is_alive():
        process.kill()
        process.join()
    return {"parent": parent, "child": child, "exitcode": process.exitcode}


def run_dataloader():
    """A torch DataLoader with 2 workers (fork, Linux's default) whose dataset calls fastnorm."""
    import torch

    class Digests(torch.utils.data.Dataset):
        def __len__(self):
            return 2 * len(CASES)

        def __getitem__(self, index):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                digest = case_digest(index % len(CASES))
            messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            return {"digest": digest, "pid": os.getpid(), "warnings": messages}

    parent = digests()
    loader = torch.utils.data.DataLoader(Digests(), batch_size=None, num_workers=2, timeout=CHILD_TIMEOUT)
    assert loader.multiprocessing_context is None  # the platform default: fork on Linux
    with _forking():
        items = list(loader)
    return {
        "parent": parent,
        "start_method": multiprocessing.get_start_method(),
        "digests": [item["digest"] for item in items],
        "pids": sorted({item["pid"] for item in items}),
        "warnings": [m for item in items for m in item["warnings"]],
    }


def run_dataloader_module():
    """A fastnorm.torch module trains in the parent, then in the 2 forked workers of a DataLoader."""
    import torch

    import fastnorm.torch as fnt

    torch.manual_seed(0)
    module = fnt.GroupNorm(4, 64, activation="silu")
    inputs = [torch.randn(4, 64, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]

    def step(index):
        x = inputs[index % 2].clone().requires_grad_()
        y = module(x)
        y.square().sum().backward()
        digest = hashlib.sha256(y.detach().numpy().tobytes() + x.grad.numpy().tobytes()).hexdigest()
        module.zero_grad()
        return digest

    class Steps(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"digest": step(index), "pid": os.getpid()}

    parent = [step(i) for i in range(4)]  # fastnorm has run (and started its pool) before the fork
    loader = torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=2, timeout=CHILD_TIMEOUT)
    with _forking(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the serial-builds warning under GNU OpenMP
        items = list(loader)
    return {
        "parent": parent,
        "digests": [i["digest"] for i in items],
        "pids": sorted({i["pid"] for i in items}),
    }


def run_without_fallback():
    """``run_os_fork`` with the child's fallback disabled: shows what it prevents."""
    _threading.fork_unsafe = lambda: False  # this process only (a subprocess)
    return run_os_fork()


SCENARIOS = {
    "os_fork": run_os_fork,
    "multiprocessing_fork": run_multiprocessing_fork,
    "dataloader": run_dataloader,
    "dataloader_module": run_dataloader_module,
    "without_fallback": run_without_fallback,
}


def run_scenarios(names, layer=None, timeout=3 * CHILD_TIMEOUT):
    """Run ``names`` in a fresh process, with ``NUMBA_THREADING_LAYER=layer`` (unset for ``None``)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *names],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def _process_facts():
    maps = Path("/proc/self/maps")
    return {
        "layer": numba.threading_layer(),
        "tbb_library": _threading.TBB_LIBRARY,
        "libtbb_mapped": maps.exists() and "libtbb.so" in maps.read_text(),
        "show_config": fastnorm.show_config(as_dict=True)["threading"],
    }


def _check_forked(report, serial):
    """The child exited normally with the parent's digests; ``serial``: whether it fell back."""
    assert report["exitcode"] == 0, report
    child = report["child"]
    assert child is not None and "error" not in child, report
    assert child["digests"] == report["parent"]
    assert child["serial_after_fork"] is serial
    if serial and not child["torch_one_thread"]:
        assert len(child["warnings"]) == 1, child["warnings"]  # once, though every case fell back
        assert "single-threaded" in child["warnings"][0] and "tbb" in child["warnings"][0]
    else:
        assert child["warnings"] == []


# ---------------------------------------------------------------------------
# This process: the default install's layer
# ---------------------------------------------------------------------------


def test_os_fork_child_matches_parent():
    report = run_os_fork()
    _check_forked(report, serial=_threading.fork_unsafe())
    assert report["child"]["layer"] == numba.threading_layer()


def test_multiprocessing_fork_child_matches_parent():
    report = run_multiprocessing_fork()
    _check_forked(report, serial=_threading.fork_unsafe())


@pytest.mark.torch
def test_dataloader_workers_match_parent():
    pytest.importorskip("torch")
    report = run_dataloader()
    assert report["start_method"] == "fork"
    assert report["digests"] == report["parent"] * 2
    assert len(report["pids"]) == 2 and os.getpid() not in report["pids"]
    # A DataLoader worker runs torch on one thread: the serial builds warn nothing there.
    assert report["warnings"] == []


@pytest.mark.torch
def test_dataloader_workers_train_a_fastnorm_torch_module_like_the_parent():
    """fastnorm.torch in DataLoader workers forked after the parent ran it: the same bits."""
    pytest.importorskip("torch")
    report = run_dataloader_module()
    assert sorted(report["digests"]) == sorted(report["parent"])
    assert len(report["pids"]) == 2 and os.getpid() not in report["pids"]


# ---------------------------------------------------------------------------
# Fresh processes: the default layer, and the layers a user can force
# ---------------------------------------------------------------------------


def test_default_layer_is_tbb_when_the_tbb_package_is_installed():
    """``pip install 'fastnorm[tbb]'`` gives TBB: libtbb is loaded from the venv's lib folder."""
    if not _tbb_installed():
        pytest.skip("the tbb package is not installed (extra 'tbb')")
    facts, _ = run_scenarios(["facts"])
    assert facts["layer"] == "tbb"
    path = Path(facts["tbb_library"])
    assert path.name == "libtbb.so.12" and path.is_file()
    assert facts["libtbb_mapped"]
    config = facts["show_config"]
    assert config["layer"] == "tbb" and config["active"] and config["fork_safe"]
    assert config["tbb"] == f"loaded {path}"


def test_forced_omp_forked_children_run_serial_builds_with_the_same_bits():
    """GNU OpenMP kills a forked child's parallel region: the child runs the serial builds, warns once."""
    facts, stderr = run_scenarios(["facts", "os_fork", "multiprocessing_fork"], layer="omp")
    assert facts["layer"] == "omp"
    # NUMBA_THREADING_LAYER=omp is respected: libtbb is not even loaded.
    assert facts["tbb_library"] is None and not facts["libtbb_mapped"]
    assert facts["show_config"]["fork_safe"] is False
    assert "'omp'" in facts["show_config"]["tbb"]
    _check_forked(facts["os_fork"], serial=True)
    _check_forked(facts["multiprocessing_fork"], serial=True)
    assert "Terminating" not in stderr


def test_forced_omp_without_the_fallback_kills_the_child():
    """The control: with the fallback disabled the same child dies (SIGTERM from Numba's omppool)."""
    facts, stderr = run_scenarios(["without_fallback"], layer="omp")
    report = facts["without_fallback"]
    assert report["exitcode"] == -signal.SIGTERM, report
    assert report["child"] is None
    assert "Terminating: fork() called from a process already using GNU OpenMP" in stderr


def test_forced_workqueue_forked_children_keep_the_parallel_builds():
    facts, _ = run_scenarios(["facts", "os_fork", "multiprocessing_fork"], layer="workqueue")
    assert facts["layer"] == "workqueue" and facts["show_config"]["fork_safe"]
    _check_forked(facts["os_fork"], serial=False)
    _check_forked(facts["multiprocessing_fork"], serial=False)


@pytest.mark.torch
def test_forced_omp_dataloader_workers_match_parent():
    pytest.importorskip("torch")
    facts, _ = run_scenarios(["facts", "dataloader"], layer="omp")
    report = facts["dataloader"]
    assert facts["layer"] == "omp" and report["start_method"] == "fork"
    assert report["digests"] == report["parent"] * 2
    assert len(report["pids"]) == 2
    # The workers ran the serial builds (the same bits, above) without a warning: torch runs
    # one thread in a DataLoader worker, so one thread is what was asked for there.
    assert report["warnings"] == []


if __name__ == "__main__":
    out = {}
    for name in sys.argv[1:]:
        if name != "facts":
            out[name] = SCENARIOS[name]()
    if "facts" in sys.argv[1:]:
        digests()  # start the pool first
        out.update(_process_facts())
    print(json.dumps(out))

"""pytest-benchmark suite: every kind x pass x layout x dtype x size, for fastnorm and its baselines.

Not collected by the normal test run (``testpaths = ["tests"]`` in pyproject.toml);
needs the ``bench`` extra (pytest-benchmark).  Run, from the repository root::

    python -m pytest benchmarks/suite --benchmark-only
    python -m pytest benchmarks/suite --benchmark-only -k "mid and f32" --benchmark-group-by=group

Each benchmark's group is its case id, so fastnorm, torch, the memcpy of the
same tensor (``np.copyto``, one thread) and the pass's traffic floor (a
parallel kernel that only reads the inputs and writes the output once:
``bench.floor_copy`` / ``bench.floor_add``) are listed together.  The cases, data and
callables are those of ``python -m benchmarks`` (the :mod:`benchmarks` package):
GroupNorm uses 32 groups (``bench.group_count``), fastnorm writes into
preallocated ``out=`` buffers, torch's backward times only
``torch.autograd.grad`` on a graph built beforehand, and oneDNN (where
oneDNN 3.2 has the case and ``onednn-cpu-gomp`` is installed) runs on
preallocated buffers too.  The session makes glibc reuse freed memory
(``bench.reuse_freed_memory``), so that torch's output allocations do not
page-fault on every call.
"""

import pytest

import benchmarks as bench

CASES = bench.all_cases()
IMPLEMENTATIONS = ("fastnorm", "torch", "memcpy", "floor", "onednn")


def _onednn_available():
    from benchmarks.baselines import onednn

    try:
        bench.load_onednn()
    except onednn.OneDNNError:
        return False
    return True


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[f"{case.size}-{case.id}" for case in CASES])
def test_norm(benchmark, case, impl, bench_threads):
    if impl == "torch" and bench.optional_torch() is None:
        pytest.skip("torch is not installed")
    if impl == "onednn":
        if not _onednn_available():
            pytest.skip("oneDNN is not installed (pip install onednn-cpu-gomp)")
        bench.set_threads(bench_threads)  # oneDNN is loaded lazily, after the session fixture
    workload = bench.make_workload(case, with_torch=impl == "torch", with_onednn=impl == "onednn")
    fn = getattr(workload, impl)
    if fn is None:
        pytest.skip("oneDNN 3.2 has no primitive for this case")
    fn()  # warm-up: Numba compilation (or cache load) and first touch are not timed
    benchmark.group = case.id
    benchmark.extra_info.update(
        kind=bench.KINDS[case.kind],
        pass_=case.pass_,
        layout=case.layout,
        dtype=case.dtype,
        size=case.size,
        shape=list(case.shape),
        nbytes=case.nbytes,
        threads=bench_threads,
    )
    benchmark(fn)

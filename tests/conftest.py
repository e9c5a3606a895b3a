"""Fixtures and collection rules shared by the test modules.

Under ``NUMBA_DISABLE_JIT=1`` (``make coverage``) every kernel runs as plain
Python: tests marked ``jit`` (LLVM IR, C ABI) are skipped, and the
RuntimeWarnings that NumPy *scalars* raise for inf/NaN arithmetic inside
``fastnorm._kernels`` are ignored (the compiled kernels raise none; the values
are the same).

With ``FASTNORM_REQUIRE_ALL=1`` (``.ci/run``) every test must run: a test that
skips itself at run time (``pytest.skip``, ``pytest.importorskip``: torch,
cffi, gcc, oneDNN... missing) fails instead, and so does a test module that
skips itself at import.  Skips declared with a ``skip`` or ``skipif`` mark
(among them the ``jit`` tests under ``NUMBA_DISABLE_JIT=1``) stay skips.
"""

import os

import numba
import pytest

#: Environment variable that turns the skips of missing dependencies into failures.
REQUIRE_ALL_ENV = "FASTNORM_REQUIRE_ALL"
REQUIRE_ALL = os.environ.get(REQUIRE_ALL_ENV) == "1"


def pytest_configure(config):
    if numba.config.DISABLE_JIT:
        config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:fastnorm._kernels")


#: Test modules that share one pytest-xdist worker: both build libfastnorm.so, whose cold
#: compile (minutes) would otherwise run twice at once.
_SHARED_SCOPES = {"tests/test_capi_fuzz.py": "tests/test_capi.py"}


#: Modules whose tests are units of work of their own (the fuzzer's run for minutes; the
#: vectorization check's each compile a helper without the cache).  Not a module with a
#: costly module-scoped fixture: each worker that runs one of its tests builds the fixture
#: (``tests/test_vectorized_kernels.py`` is one unit for that reason).
_SPLIT_MODULES = {"tests/test_fuzz_api.py", "tests/test_vectorized.py"}


def _module_of(nodeid):
    """The test module of ``nodeid``, or the module it shares a worker with (:data:`_SHARED_SCOPES`)."""
    module = nodeid.split("::", 1)[0]
    return _SHARED_SCOPES.get(module, module)


def _module_scope(nodeid):
    """A pytest-xdist worker's unit of work: a module, or a test of :data:`_SPLIT_MODULES`."""
    return nodeid if nodeid.split("::", 1)[0] in _SPLIT_MODULES else _module_of(nodeid)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """With ``pytest -n 2`` (``make test``): each worker runs whole modules, in collection order.

    A cold run is mostly Numba compiling, one core per process: a module's kernels are
    compiled once, by one worker, then loaded from the on-disk cache by any other.
    """
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _module_scope(nodeid)

    config.option.loadscopereorder = False  # collection order: the longest modules first
    return ModuleScheduling(config, log)


#: Modules that run first, longest first (the C library's build and fuzzing, the kernels'
#: uncached builds for the vectorization check, the Python fuzzer, the loop helpers'
#: uncached builds), so that no worker is left with a long one at the end.
_FIRST = (
    "tests/test_capi.py",
    "tests/test_vectorized_kernels.py",
    "tests/test_fuzz_api.py",
    "tests/test_vectorized.py",
)


def _run_order(item):
    """Sort key of a test: the modules of :data:`_FIRST` in that order, then the rest as collected."""
    module = _module_of(item.nodeid)
    return _FIRST.index(module) if module in _FIRST else len(_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)
    if not numba.config.DISABLE_JIT:
        return
    skip = pytest.mark.skip(reason="needs compiled kernels; NUMBA_DISABLE_JIT=1 runs them as Python")
    for item in items:
        if "jit" in item.keywords:
            item.add_marker(skip)


def _skip_reason(longrepr):
    """The message of a skip report's ``(path, line, "Skipped: message")``."""
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix("Skipped: ")


def _skipped_by_mark(item):
    """Whether a ``skip`` mark, or a ``skipif`` mark with a true condition, applies to ``item``."""
    if item.get_closest_marker("skip") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        conditions = mark.args if mark.args else (mark.kwargs.get("condition", True),)
        if any(isinstance(c, str) or bool(c) for c in conditions):
            return True
    return False


def _required_message(reason):
    return f"{REQUIRE_ALL_ENV}=1: every test must run, but this one was skipped ({reason})"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (
        REQUIRE_ALL
        and report.skipped
        and not hasattr(report, "wasxfail")
        and not (report.when == "setup" and _skipped_by_mark(item))
    ):
        report.outcome = "failed"
        report.longrepr = _required_message(_skip_reason(report.longrepr))
    return report


class ModuleSkippedAtImport(pytest.Item):
    """Stands for a test module that skipped itself at import, and fails with the skip's reason."""

    def __init__(self, *, reason, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self):
        pytest.fail(_required_message(self.reason), pytrace=False)

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    report = yield
    if REQUIRE_ALL and report.skipped and isinstance(collector, pytest.Module):
        item = ModuleSkippedAtImport.from_parent(
            collector, name="skipped-at-import", reason=_skip_reason(report.longrepr)
        )
        report = pytest.CollectReport(report.nodeid, "passed", None, [item])
    return report


@pytest.fixture
def restore_threads():
    """Give the test Numba's thread count back as it found it."""
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)

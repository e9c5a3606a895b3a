"""Every output of the fixed corpus (``tests/corpus.py``) is bitwise what it was when pinned.

The digests in ``tests/data/corpus.json`` (one set per host CPU) were written
from the kernels before their restructuring into one schedule table and a
family laid out by data view, and before the fused epilogue; any change of
arithmetic or summation order shows up here, case by case.  Regenerate them
(``python tests/corpus.py --write``) only for a change that is meant to change
results, and say so in the commit.
"""

from __future__ import annotations

import corpus
import numba
import pytest

pytestmark = pytest.mark.jit  # the digests are of the compiled kernels' machine code

BY_CPU = corpus.pinned_digests()

# A mark, not a skip inside the test: on a CPU without pinned digests they cannot be checked
# (another vector width sums in another order), and FASTNORM_REQUIRE_ALL=1 lets only marked
# skips through.
same_cpu = pytest.mark.skipif(
    corpus.host_cpu() not in BY_CPU,
    reason=f"digests pinned on {sorted(BY_CPU)}, this host is {corpus.host_cpu()!r}",
)
PINNED = BY_CPU.get(corpus.host_cpu(), {})


def _mismatches():
    got = corpus.compute()
    pinned = PINNED
    assert sorted(got) == sorted(pinned), "the corpus and its pinned digests list different cases"
    return [
        f"{name}: {got[name]} != pinned {pinned[name]}" for name in sorted(got) if got[name] != pinned[name]
    ]


@same_cpu
@pytest.mark.parametrize("threads", ["all", 1])
def test_corpus_outputs_are_bitwise_pinned(threads, restore_threads):
    if threads == 1:
        numba.set_num_threads(1)
    bad = _mismatches()
    assert not bad, f"{len(bad)} of {len(PINNED)} corpus cases changed:\n" + "\n".join(bad[:40])


def test_corpus_covers_every_kind_layout_dtype_and_pass():
    entries = corpus.corpus()
    combos = {(c.kind, layout, dtype.__name__, affine) for c, layout, dtype, affine in entries.values()}
    for kind in ("batch_norm", "instance_norm", "group_norm"):
        for layout in ("cf", "cl", "cl_memory"):
            for dtype in ("float32", "float64"):
                assert (kind, layout, dtype, "wb") in combos
                assert (kind, layout, dtype, "none") in combos
    for kind in ("layer_norm", "rms_norm"):
        for dtype in ("float32", "float64"):
            assert (kind, "cf", dtype, "none") in combos
    # every schedule of test_kernel_paths.py is in the corpus
    names = {str(c) for c, *_ in entries.values()}
    assert all(str(c) in names for c in corpus._path_cases())

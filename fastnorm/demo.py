"""Demo: normalize an NCHW activation batch with every norm and time it against NumPy.

Run with ``python -m fastnorm.demo`` (``make demo``).  The first run compiles
the kernels (cached on disk afterwards).
"""

from __future__ import annotations

import time

import numpy as np

import fastnorm


def _numpy_norm(x, axes, weight, bias, eps=1e-5, centered=True):
    """Plain NumPy float32 reference of the same normalization (for timing)."""
    mean = x.mean(axis=axes, keepdims=True) if centered else 0.0
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    """Run the demo and print a table of timings."""
    rng = np.random.default_rng(0)
    n, c, h, w = 32, 64, 56, 56  # a ResNet stage-1 activation batch
    # Activations with per-channel offsets and scales, as after a convolution.
    x = (
        rng.standard_normal((n, c, h, w), np.float32) * rng.uniform(0.5, 3.0, (1, c, 1, 1))
        + rng.uniform(-2, 2, (1, c, 1, 1))
    ).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    wb = weight[:, None, None], bias[:, None, None]
    ln_weight = np.ones((c, h, w), np.float32)
    out = np.empty_like(x)
    print(f"fastnorm {fastnorm.__version__}: x = {x.shape} float32 ({x.nbytes / 1e6:.1f} MB)")
    cases = [
        (
            "batch_norm",
            lambda: fastnorm.batch_norm(x, None, None, weight, bias, training=True, out=out),
            lambda: _numpy_norm(x, (0, 2, 3), *wb),
        ),
        (
            "instance_norm",
            lambda: fastnorm.instance_norm(x, weight=weight, bias=bias, out=out),
            lambda: _numpy_norm(x, (2, 3), *wb),
        ),
        (
            "group_norm(8)",
            lambda: fastnorm.group_norm(x, 8, weight, bias, out=out),
            lambda: _numpy_norm(x.reshape(n, 8, -1), (2,), 1.0, 0.0).reshape(x.shape) * wb[0] + wb[1],
        ),
        (
            "layer_norm(C,H,W)",
            lambda: fastnorm.layer_norm(x, (c, h, w), ln_weight, out=out),
            lambda: _numpy_norm(x, (1, 2, 3), ln_weight, 0.0),
        ),
        (
            "rms_norm(W)",
            lambda: fastnorm.rms_norm(x, (w,), eps=1e-5, out=out),
            lambda: _numpy_norm(x, (3,), 1.0, 0.0, centered=False),
        ),
    ]
    copy_time = _best_of(lambda: np.copyto(out, x))
    print(f"{'norm':<20}{'fastnorm ms':>12}{'numpy ms':>10}{'speed-up':>10}{'max |diff|':>12}")
    for name, fast, slow in cases:
        t_fast = _best_of(fast)
        t_slow = _best_of(slow, repeats=2)
        diff = float(np.abs(fast() - slow()).max())
        print(f"{name:<20}{t_fast * 1e3:>12.2f}{t_slow * 1e3:>10.1f}{t_slow / t_fast:>9.1f}x{diff:>12.2e}")
    print(f"(numpy copy of x into a preallocated buffer: {copy_time * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()

"""Forward and forward+backward of every kind on one NCHW batch, against torch and a copy.

Usage, from the repository root::

    python -m benchmarks.nchw_all_kinds [--shape 32,64,56,56] [--rounds 11] [--dtype float32]

Every kind normalizes the same ``x``: BatchNorm, InstanceNorm, GroupNorm(32),
LayerNorm and RMSNorm over ``(C, H, W)``.  fastnorm, ``torch.nn.functional``
(forward, and forward + ``autograd.grad``) and ``np.copyto`` of ``x`` are timed
interleaved in rounds in one process (:func:`benchmarks.timing.interleaved`);
the table gives medians over rounds and their ratios.  fastnorm writes into
preallocated outputs.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import fastnorm
from benchmarks.timing import interleaved


def _torch_calls(torch, kind, x, dy, weight, bias):
    functional = torch.nn.functional
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(weight).requires_grad_(True)
    bt = torch.from_numpy(bias).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    shape = tuple(x.shape[1:])

    def forward():
        if kind == "batch_norm":
            return functional.batch_norm(xt, None, None, wt, bt, training=True)
        if kind == "instance_norm":
            return functional.instance_norm(xt, weight=wt, bias=bt)
        if kind == "group_norm":
            return functional.group_norm(xt, 32, wt, bt)
        if kind == "layer_norm":
            return functional.layer_norm(xt, shape, wt, bt)
        return functional.rms_norm(xt, shape, wt)

    def forward_no_grad():
        with torch.no_grad():
            forward()

    def forward_backward():
        inputs = (xt, wt) if kind == "rms_norm" else (xt, wt, bt)
        torch.autograd.grad(forward(), inputs, dyt)

    return forward_no_grad, forward_backward


def main():
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    copy_out = np.empty_like(x)
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for kind in ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"):
        if kind == "batch_norm":
            spec = fastnorm.NormSpec.batch_norm()
        elif kind == "instance_norm":
            spec = fastnorm.NormSpec.instance_norm()
        elif kind == "group_norm":
            spec = fastnorm.NormSpec.group_norm(32)
        elif kind == "layer_norm":
            spec = fastnorm.NormSpec.layer_norm(3)
        else:
            spec = fastnorm.NormSpec.rms_norm(3)
        pshape = shape[1:] if kind in ("layer_norm", "rms_norm") else (shape[1],)
        weight = rng.uniform(0.5, 1.5, pshape).astype(args.dtype)
        bias = rng.uniform(-0.5, 0.5, pshape).astype(args.dtype)
        fn_bias = None if kind == "rms_norm" else bias
        y, dx = np.empty_like(x), np.empty_like(x)

        def fn_forward(spec=spec, weight=weight, fn_bias=fn_bias, y=y):
            return fastnorm.forward(x, spec, weight, fn_bias, out=y)

        def fn_forward_backward(spec=spec, weight=weight, fn_bias=fn_bias, y=y, dx=dx):
            _, stats = fastnorm.forward(x, spec, weight, fn_bias, out=y)
            fastnorm.backward(dy, x, stats, spec, weight, out=dx)

        entries = [
            ("copy", lambda: np.copyto(copy_out, x), None),
            ("fn_fwd", fn_forward, None),
            ("fn_fwdbwd", fn_forward_backward, None),
        ]
        if torch is not None:
            t_fwd, t_fwdbwd = _torch_calls(torch, kind, x, dy, weight, bias)
            entries += [("torch_fwd", t_fwd, None), ("torch_fwdbwd", t_fwdbwd, None)]
        samples = interleaved(entries, args.rounds)
        med = {name: statistics.median(values) for name, values in samples.items()}
        rows.append((kind, med))
    print(f"x = {shape} {args.dtype}, medians of {args.rounds} interleaved rounds")
    print(
        "| kind | fastnorm fwd ms | fwd+bwd ms | torch fwd ms | torch fwd+bwd ms "
        "| fwd / torch | fwd+bwd / torch | fwd / copy | fwd+bwd / copy |"
    )
    print("|" + "---|" * 9)
    for kind, med in rows:
        tf, tfb = med.get("torch_fwd", float("nan")), med.get("torch_fwdbwd", float("nan"))
        print(
            f"| {kind} | {med['fn_fwd'] * 1e3:.2f} | {med['fn_fwdbwd'] * 1e3:.2f} | {tf * 1e3:.2f} | "
            f"{tfb * 1e3:.2f} | {med['fn_fwd'] / tf:.2f} | {med['fn_fwdbwd'] / tfb:.2f} | "
            f"{med['fn_fwd'] / med['copy']:.2f} | {med['fn_fwdbwd'] / med['copy']:.2f} |"
        )
    print(f"(numpy copy of x: {statistics.median(m['copy'] for _, m in rows) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()

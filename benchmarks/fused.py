"""The fused epilogue against the plain norm and against torch's unfused composite.

Usage, from the repository root::

    python -m benchmarks.fused [--rounds 11] [--dtype float32] [--activation relu]

For each case (BatchNorm on a ResNet stage, channels-first and channels-last,
and LayerNorm on BERT rows) it times, interleaved in rounds in one process
(:func:`benchmarks.timing.interleaved`):

* ``plain fwd``: :func:`fastnorm.forward` without an epilogue;
* ``fused fwd``: the same with ``residual=`` and the activation;
* ``fused fwd+bwd``: that forward and :func:`fastnorm.backward` (``dresidual`` too);
* ``torch fwd`` / ``torch fwd+bwd``: ``F.batch_norm`` / ``F.layer_norm`` -> add
  -> activation, and ``autograd.grad`` of x, weight, bias and the residual.

A second table does the same for the pre-norm skip add (LayerNorm on BERT rows,
RMSNorm on LLaMA rows): ``plain fwd`` is the norm of ``x``; ``skip fwd`` is
:func:`fastnorm.forward` with ``skip=`` and ``skip_bias=`` (``y`` and ``h``);
``skip fwd+bwd`` adds :func:`fastnorm.backward` (``dskip_bias`` too); torch runs
``x + skip + skip_bias`` -> ``F.layer_norm`` / ``F.rms_norm`` and ``autograd.grad``
of x, skip, the weight(s) and the skip bias.

The tables give medians over rounds of the per-round ratios.  fastnorm writes
``y``, ``h`` and ``dx`` into preallocated outputs.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import fastnorm
from benchmarks.timing import interleaved

#: ``(label, kind, logical NCHW or row shape, channels_last)``.
CASES = (
    ("bn nchw (32,64,56,56)", "batch_norm", (32, 64, 56, 56), False),
    ("bn nhwc (32,64,56,56)", "batch_norm", (32, 64, 56, 56), True),
    ("ln (4096,768)", "layer_norm", (4096, 768), False),
)

#: ``(label, kind, row shape)`` of the skip-add table.
SKIP_CASES = (
    ("skip ln (4096,768)", "layer_norm", (4096, 768)),
    ("skip ln (1024,1024)", "layer_norm", (1024, 1024)),
    ("skip rms (2048,4096)", "rms_norm", (2048, 4096)),
)


def _torch_calls(torch, kind, x, r, dy, weight, bias, channels_last, activation):
    functional = torch.nn.functional
    act = {"relu": functional.relu, "gelu": functional.gelu, "silu": functional.silu}[activation]
    xt = torch.from_numpy(x)
    rt = torch.from_numpy(r)
    dyt = torch.from_numpy(dy)
    if channels_last:  # logical NCHW tensors with channels-last memory, as torch runs NHWC
        xt, rt, dyt = (t.permute(0, 3, 1, 2) for t in (xt, rt, dyt))
    xt.requires_grad_(True)
    rt.requires_grad_(True)
    wt = torch.from_numpy(weight).requires_grad_(True)
    bt = torch.from_numpy(bias).requires_grad_(True)

    def forward():
        if kind == "batch_norm":
            z = functional.batch_norm(xt, None, None, wt, bt, training=True)
        else:
            z = functional.layer_norm(xt, (x.shape[-1],), wt, bt)
        return act(z + rt)

    def forward_backward():
        torch.autograd.grad(forward(), (xt, wt, bt, rt), dyt)

    return forward, forward_backward


def _skip_rows(torch, dtype, rounds):
    """Time the skip-add cases: ``[(label, samples)]``."""
    rng = np.random.default_rng(1)
    rows = []
    for label, kind, shape in SKIP_CASES:
        x, skip, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
        width = shape[-1]
        weight = rng.uniform(0.5, 1.5, width).astype(dtype)
        bias = rng.uniform(-0.5, 0.5, width).astype(dtype) if kind == "layer_norm" else None
        skip_bias = rng.uniform(-0.5, 0.5, width).astype(dtype)
        spec = fastnorm.NormSpec.layer_norm(1) if kind == "layer_norm" else fastnorm.NormSpec.rms_norm(1)
        y, h, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)

        def plain_forward(x=x, spec=spec, weight=weight, bias=bias, y=y):
            fastnorm.forward(x, spec, weight, bias, out=y)

        def skip_forward(x=x, skip=skip, spec=spec, weight=weight, bias=bias, sb=skip_bias, y=y, h=h):
            fastnorm.forward(x, spec, weight, bias, skip=skip, skip_bias=sb, out=y, sum_out=h)

        def skip_forward_backward(
            x=x, skip=skip, dy=dy, spec=spec, weight=weight, bias=bias, sb=skip_bias, y=y, h=h, dx=dx
        ):
            _, stats = fastnorm.forward(x, spec, weight, bias, skip=skip, skip_bias=sb, out=y, sum_out=h)
            fastnorm.backward(dy, x, stats, spec, weight, out=dx)

        entries = [
            ("plain", plain_forward, None),
            ("fused", skip_forward, None),
            ("fused_fb", skip_forward_backward, None),
        ]
        if torch is not None:
            leaves = [torch.from_numpy(a).requires_grad_(True) for a in (x, skip, weight, skip_bias)]
            if bias is not None:
                leaves.append(torch.from_numpy(bias).requires_grad_(True))
            dyt = torch.from_numpy(dy)

            def t_forward(leaves=leaves, kind=kind, width=width, functional=torch.nn.functional):
                ht = leaves[0] + leaves[1] + leaves[3]
                if kind == "layer_norm":
                    return functional.layer_norm(ht, (width,), leaves[2], leaves[4])
                return functional.rms_norm(ht, (width,), leaves[2])

            def t_forward_backward(leaves=leaves, dyt=dyt, t_forward=t_forward):
                torch.autograd.grad(t_forward(), leaves, dyt)

            entries += [("torch", t_forward, None), ("torch_fb", t_forward_backward, None)]
        rows.append((label, interleaved(entries, rounds)))
    return rows


def _ratio(samples, a, b):
    if b not in samples:
        return float("nan")
    return statistics.median(p / q for p, q in zip(samples[a], samples[b], strict=True))


def _print_table(rows, names):
    print(
        f"| case | plain fwd ms | {names} fwd ms | {names} fwd+bwd ms | torch fwd ms | torch fwd+bwd ms "
        f"| {names} / plain fwd | {names} / torch fwd | {names} / torch fwd+bwd |"
    )
    print("|" + "---|" * 9)
    for label, samples in rows:
        med = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        print(
            f"| {label} | {med['plain']:.2f} | {med['fused']:.2f} | {med['fused_fb']:.2f} | "
            f"{med.get('torch', float('nan')):.2f} | {med.get('torch_fb', float('nan')):.2f} | "
            f"{_ratio(samples, 'fused', 'plain'):.2f} | {_ratio(samples, 'fused', 'torch'):.2f} | "
            f"{_ratio(samples, 'fused_fb', 'torch_fb'):.2f} |"
        )


def main():
    """Measure and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--activation", default="relu", choices=("relu", "gelu", "silu"))
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    rows = []
    for label, kind, shape, channels_last in CASES:
        memory_shape = (shape[0], *shape[2:], shape[1]) if channels_last else shape
        x, r, dy = (rng.standard_normal(memory_shape).astype(args.dtype) for _ in range(3))
        pshape = (shape[1],) if kind == "batch_norm" else (shape[-1],)
        weight = rng.uniform(0.5, 1.5, pshape).astype(args.dtype)
        bias = rng.uniform(-0.5, 0.5, pshape).astype(args.dtype)
        if kind == "batch_norm":
            plain = fastnorm.NormSpec.batch_norm(channels_last=channels_last)
            fused = fastnorm.NormSpec.batch_norm(channels_last=channels_last, activation=args.activation)
        else:
            plain = fastnorm.NormSpec.layer_norm(1)
            fused = fastnorm.NormSpec.layer_norm(1, activation=args.activation)
        y, dx = np.empty_like(x), np.empty_like(x)

        def plain_forward(plain=plain, x=x, weight=weight, bias=bias, y=y):
            fastnorm.forward(x, plain, weight, bias, out=y)

        def fused_forward(fused=fused, x=x, r=r, weight=weight, bias=bias, y=y):
            fastnorm.forward(x, fused, weight, bias, residual=r, out=y)

        def fused_forward_backward(fused=fused, x=x, r=r, dy=dy, weight=weight, bias=bias, y=y, dx=dx):
            _, stats = fastnorm.forward(x, fused, weight, bias, residual=r, out=y)
            fastnorm.backward(dy, x, stats, fused, weight, bias=bias, residual=r, out=dx)

        entries = [
            ("plain", plain_forward, None),
            ("fused", fused_forward, None),
            ("fused_fb", fused_forward_backward, None),
        ]
        if torch is not None:
            t_fwd, t_fwdbwd = _torch_calls(
                torch, kind, x, r, dy, weight, bias, channels_last, args.activation
            )
            entries += [("torch", t_fwd, None), ("torch_fb", t_fwdbwd, None)]
        samples = interleaved(entries, args.rounds)
        rows.append((label, samples))

    print(
        f"{args.activation}(norm(x) * w + b + r), {args.dtype}, medians of {args.rounds} interleaved rounds"
    )
    _print_table(rows, "fused")
    print()
    print(f"norm(x + skip + skip_bias), {args.dtype}, medians of {args.rounds} interleaved rounds")
    _print_table(_skip_rows(torch, args.dtype, args.rounds), "skip")


if __name__ == "__main__":
    main()

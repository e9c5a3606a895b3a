"""The fused epilogue against the plain norm and against torch's unfused composite.

Usage, from the repository root::

    python -m benchmarks.fused [--rounds 11]

For each epilogue case of the suite (:data:`benchmarks.cases.EPILOGUE_CASES`:
``relu(bn(x) + residual)`` on a ResNet stage, channels-first and channels-last;
``silu(group_norm(x))`` on a Stable-Diffusion UNet layer; the pre-norm skip add
``norm(x + skip + skip_bias)`` of BERT LayerNorm rows and LLaMA RMSNorm rows) it
times, interleaved in rounds in one process (:func:`benchmarks.timing.interleaved`),
on the same data (:func:`benchmarks.workloads.make_workload`):

* ``plain fwd``: :func:`fastnorm.forward` of the norm alone (the ``fwd`` case);
* ``fused fwd``: the forward with the epilogue (the ``<epilogue>_fwd`` case);
* ``fused fwd+bwd``: that forward and :func:`fastnorm.backward` (``<epilogue>_fb``);
* ``torch fwd`` / ``torch fwd+bwd``: torch's unfused composite, without autograd,
  and with ``autograd.grad`` of every input and parameter.

The table gives medians over rounds of the per-round ratios.  fastnorm writes
``y``, ``h`` and ``dx`` into preallocated outputs.  ``python -m benchmarks
--passes resrelu_fb ...`` times the same cases in the suite and its gate.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.cases import EPILOGUE_CASES, Case
from benchmarks.timing import interleaved
from benchmarks.workloads import make_workload


def _ratio(samples, a, b):
    if b not in samples:
        return float("nan")
    return statistics.median(p / q for p, q in zip(samples[a], samples[b], strict=True))


def measure(rounds):
    """Time every epilogue case; return ``[(label, samples)]``."""
    rows = []
    for kind, epilogue, layouts, shape in EPILOGUE_CASES:
        for layout in layouts:
            plain, fwd, fb = (
                make_workload(Case(kind, pass_, layout, "float32", "large", shape))
                for pass_ in ("fwd", f"{epilogue}_fwd", f"{epilogue}_fb")
            )
            entries = [("plain", plain.fastnorm, None), ("fused", fwd.fastnorm, None)]
            entries += [
                ("fused_fb", fb.fastnorm, None),
                ("floor", fwd.floor, None),
                ("floor_fb", fb.floor, None),
            ]
            if fwd.torch is not None:
                entries += [("torch", fwd.torch, None), ("torch_fb", fb.torch, None)]
            label = f"{kind} {epilogue} {layout} {'x'.join(map(str, shape))}"
            rows.append((label, interleaved(entries, rounds)))
    return rows


def main():
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    rows = measure(args.rounds)
    print(f"float32, medians of {args.rounds} interleaved rounds")
    print(
        "| case | plain fwd ms | fused fwd ms | fused fwd+bwd ms | torch fwd ms | torch fwd+bwd ms "
        "| fused / plain fwd | fused / torch fwd | fused / torch fwd+bwd | floor fwd+bwd ms "
        "| fused / floor fwd+bwd | torch / floor fwd+bwd |"
    )
    print("|" + "---|" * 12)
    for label, samples in rows:
        med = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        print(
            f"| {label} | {med['plain']:.2f} | {med['fused']:.2f} | {med['fused_fb']:.2f} | "
            f"{med.get('torch', float('nan')):.2f} | {med.get('torch_fb', float('nan')):.2f} | "
            f"{_ratio(samples, 'fused', 'plain'):.2f} | {_ratio(samples, 'fused', 'torch'):.2f} | "
            f"{_ratio(samples, 'fused_fb', 'torch_fb'):.2f} | {med['floor_fb']:.2f} | "
            f"{_ratio(samples, 'fused_fb', 'floor_fb'):.2f} | {_ratio(samples, 'torch_fb', 'floor_fb'):.2f} |"
        )


if __name__ == "__main__":
    main()

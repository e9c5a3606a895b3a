"""Whole models: a training step with torch's norm layers against the same step with fastnorm's.

Usage, from the repository root::

    python -m benchmarks.models [--rounds 5] [--quick]

Two networks, built from ``torch.nn`` (torchvision does not load against the CPU torch
here), each in variants timed interleaved in rounds in one process
(:func:`benchmarks.timing.interleaved`); a step is ``zero_grad``, the forward pass, a
loss and the backward pass (no optimizer step):

* **ResNet-18** (BasicBlocks [2, 2, 2, 2], 1000 classes) on a synthetic batch
  (32, 3, 112, 112) float32, NCHW and ``channels_last``: torch's ``BatchNorm2d``;
  fastnorm's (``fastnorm.torch.convert``); and fastnorm's with the ReLU that follows
  every BatchNorm fused into it (``activation="relu"``, and the block's identity added
  as the second BatchNorm's residual).
* **A pre-LN transformer block** (width 768, 12 heads, MLP 3072, GELU) on (8, 128, 768):
  ``LayerNorm`` and ``RMSNorm``, torch's and fastnorm's.

For each variant the table gives the median step time, the median over rounds of the
per-round ratio to torch's variant, and the shares of the step spent in the norm
layers (``norms``: self CPU time of torch's norm operators, or of fastnorm's calls,
``fastnorm_forward`` and the like eagerly, ``fastnorm::`` ops compiled) and in them and
the ReLUs (``+relu``: to compare with the fused variant, whose norm operators run the
ReLUs), from one step under ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import copy
import statistics

from benchmarks.runtime import optional_torch
from benchmarks.timing import interleaved

torch = optional_torch()  # first: sets GOMP_SPINCOUNT before torch loads libgomp

#: Substrings of the profiler's operator names that are norm layers (torch's and fastnorm's).
NORM_OPS = ("batch_norm", "group_norm", "layer_norm", "rms_norm", "fastnorm")


class BasicBlock(torch.nn.Module):
    """ResNet's basic block; ``fused`` puts the ReLUs into the BatchNorms (fastnorm's only)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False), torch.nn.BatchNorm2d(planes)
            )
        self.fused = False

    def forward(self, x):
        """Return the block's output for ``x``."""
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:  # relu(bn1(.)), then relu(bn2(.) + identity), each one fastnorm call
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), identity)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(torch.nn.Module):
    """ResNet-18 (He et al. 2016) for 3-channel images."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
            inplanes = planes
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(512, num_classes)
        self.fused = False

    def forward(self, x):
        """Return the logits of the images ``x``."""
        x = self.bn1(self.conv1(x)) if self.fused else torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(self.pool(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def fuse_relus(model):
    """Give every BatchNorm of a fastnorm-converted ResNet-18 the ReLU that follows it."""
    model.fused = True
    model.bn1._set_epilogue("relu", 0.01)
    for block in model.layers:
        block.fused = True
        block.bn1._set_epilogue("relu", 0.01)
        block.bn2._set_epilogue("relu", 0.01)  # after the identity: relu(bn2(x) + identity)
    return model


class PreNormBlock(torch.nn.Module):
    """A pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width=768, heads=12, norm="layer"):
        super().__init__()
        make = torch.nn.LayerNorm if norm == "layer" else torch.nn.RMSNorm
        self.norm1, self.norm2 = make(width), make(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        """Return the block's output for the tokens ``x``."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _step(model, x, target):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, target) if target is not None else out.square().mean()
        loss.backward()

    return step


def _shares(step):
    """Fractions of one step's self CPU time in the norm operators, and in them and the ReLUs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or float("nan")
    norms = sum(e.self_cpu_time_total for e in events if any(n in e.key for n in NORM_OPS))
    relus = sum(e.self_cpu_time_total for e in events if e.key in ("aten::relu", "aten::threshold_backward"))
    return norms / total, (norms + relus) / total


def variants(quick=False):
    """``[(group, label, step, baseline label)]`` of every timed variant."""
    import fastnorm.torch as fnt

    torch.manual_seed(0)
    batch, size = (8, 64) if quick else (32, 112)
    rows = []
    resnet = ResNet18()
    target = torch.randint(0, 1000, (batch,))
    for layout in ("nchw", "channels_last"):
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
        base = copy.deepcopy(resnet).to(memory_format=memory_format)
        ours = fnt.convert(copy.deepcopy(base))
        fused = fuse_relus(fnt.convert(copy.deepcopy(base)))
        group = f"resnet18 {layout} {batch}x3x{size}x{size}"
        rows += [
            (group, "torch", _step(base, x, target), "torch"),
            (group, "fastnorm", _step(ours, x, target), "torch"),
            (group, "fastnorm+relu", _step(fused, x, target), "torch"),
        ]
    tokens = torch.randn(2 if quick else 8, 128, 768)
    for norm in ("layer", "rms"):
        base = PreNormBlock(norm=norm)
        ours = fnt.convert(copy.deepcopy(base))
        group = f"pre-LN block {norm}norm {'x'.join(map(str, tokens.shape))}"
        rows += [
            (group, "torch", _step(base, tokens, None), "torch"),
            (group, "fastnorm", _step(ours, tokens, None), "torch"),
        ]
    return rows


def main(argv=None):
    """Time the model variants and print the table."""
    parser = argparse.ArgumentParser(
        description="Training steps of whole models, torch's norms vs fastnorm's"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller batches (a smoke test)")
    parser.add_argument("--only", default="", help="only the models whose label starts with this")
    args = parser.parse_args(argv)
    import os

    spin = {name: os.environ.get(name) for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {spin}")
    rows = variants(args.quick)
    print(f"{'model':44s} {'variant':14s} {'step ms':>9s} {'/torch':>7s} {'norms':>7s} {'+relu':>7s}")
    for group in dict.fromkeys(g for g, *_ in rows if g.startswith(args.only)):
        members = [r for r in rows if r[0] == group]
        samples = interleaved([(label, step, None) for _, label, step, _ in members], args.rounds, repeats=1)
        for _, label, step, baseline in members:
            median = statistics.median(samples[label]) * 1e3
            ratio = statistics.median(a / b for a, b in zip(samples[label], samples[baseline], strict=True))
            norms, with_relus = _shares(step)
            print(f"{group:44s} {label:14s} {median:9.2f} {ratio:7.3f} {norms:7.1%} {with_relus:7.1%}")
    return rows


if __name__ == "__main__":
    main()

"""Train a small CNN on scikit-learn's digits twice: with torch's norm layers and with fastnorm's.

The 1,797 8x8 images of ``sklearn.datasets.load_digits`` ship with scikit-learn (no
download). The network is built once; a deep copy goes through
``fastnorm.torch.convert``, so both runs start from the same weights, and each run
draws its batches from a generator with the same seed. The script prints, per seed, the
test accuracy of both runs, the median time of a training step, and the largest
difference between their weights after training (rounding differences that training
amplifies)::

    python examples/train_digits.py                      # BatchNorm, 3 seeds
    python examples/train_digits.py --norm group --channels-last

Step times: torch's OpenMP threads spin-wait after each of its operations and take the
cores fastnorm's threads need; start the script with ``OMP_WAIT_POLICY=PASSIVE`` to
compare the layers rather than the thread pools (docs/pytorch.md, "Threads").
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

import fastnorm.torch as fnt


def digits(seed=0, test_fraction=0.2):
    """``(x_train, y_train, x_test, y_test)``: images as (N, 1, 8, 8) float32 in [0, 1]."""
    data = load_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_model(norm="batch", seed=0):
    """Build a small CNN: two conv blocks with a norm and ReLU, max pooling, a linear classifier."""
    torch.manual_seed(seed)

    def norm_layer(channels):
        return torch.nn.BatchNorm2d(channels) if norm == "batch" else torch.nn.GroupNorm(4, channels)

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        norm_layer(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
        norm_layer(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def train(model, data, *, epochs=5, batch_size=64, lr=0.05, seed=0, channels_last=False):
    """Train with SGD and momentum; return ``(test accuracy in %, median step time in s)``."""
    x_train, y_train, x_test, y_test = data
    if channels_last:
        x_train = x_train.contiguous(memory_format=torch.channels_last)
        x_test = x_test.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            begin = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - begin)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    return accuracy, statistics.median(times)


def compare(norm="batch", seed=0, epochs=5, channels_last=False):
    """Train torch's and fastnorm's version of the same network; return a dict of results."""
    data = digits(seed)
    reference = make_model(norm, seed)
    ours = fnt.convert(copy.deepcopy(reference))
    accuracy_torch, step_torch = train(reference, data, epochs=epochs, seed=seed, channels_last=channels_last)
    accuracy_ours, step_ours = train(ours, data, epochs=epochs, seed=seed, channels_last=channels_last)
    divergence = max(
        (a - b).abs().max().item() for a, b in zip(reference.parameters(), ours.parameters(), strict=True)
    )
    return {
        "seed": seed,
        "accuracy_torch": accuracy_torch,
        "accuracy_fastnorm": accuracy_ours,
        "step_ms_torch": step_torch * 1e3,
        "step_ms_fastnorm": step_ours * 1e3,
        "max_weight_difference": divergence,
    }


def main(argv=None):
    """Run :func:`compare` for each seed and print a table (or JSON lines with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", choices=["batch", "group"], default="batch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per seed instead of the table")
    args = parser.parse_args(argv)
    if args.json:
        for seed in range(args.seeds):
            print(json.dumps(compare(args.norm, seed, args.epochs, args.channels_last)))
        return
    print(
        f"{args.norm} norm, {args.epochs} epochs, {'channels_last' if args.channels_last else 'contiguous'}"
    )
    print("seed  acc torch  acc fastnorm  step torch  step fastnorm  max |w_torch - w_fastnorm|")
    for seed in range(args.seeds):
        row = compare(args.norm, seed, args.epochs, args.channels_last)
        accuracy = f"{row['accuracy_torch']:8.2f}%  {row['accuracy_fastnorm']:11.2f}%"
        steps = f"{row['step_ms_torch']:7.2f} ms  {row['step_ms_fastnorm']:10.2f} ms"
        print(f"{seed:4d}  {accuracy}  {steps}  {row['max_weight_difference']:.2e}")


if __name__ == "__main__":
    main()

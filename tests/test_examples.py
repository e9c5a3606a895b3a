"""examples/: the digits network trains to the same accuracy with fastnorm's layers as with torch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


@pytest.mark.parametrize("norm, layout", [("batch", []), ("group", ["--channels-last"])])
def test_digits_accuracy_matches_torch_over_three_seeds(norm, layout):
    """Same start, same batches: test accuracies within 1 point, both above 90 %, for 3 seeds."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # torch's idle threads would not spin (a speed matter)
    command = [
        sys.executable,
        str(EXAMPLE),
        "--norm",
        norm,
        "--epochs",
        "4",
        "--seeds",
        "3",
        "--json",
        *layout,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert abs(row["accuracy_torch"] - row["accuracy_fastnorm"]) <= 1.0, row
        assert min(row["accuracy_torch"], row["accuracy_fastnorm"]) > 90.0, row

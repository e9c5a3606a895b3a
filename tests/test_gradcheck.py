"""fastnorm.backward vs central finite differences of fastnorm.forward (float64, small shapes).

The loss is ``L = sum(forward(x, w, b) * dy)`` for a fixed random ``dy``, so
``dL/dx``, ``dL/dw`` and ``dL/db`` are exactly what ``backward(dy, ...)`` returns.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import arrange, bn, data, gn, inorm, ln, rms

import fastnorm

H = 1e-6

CASES = [
    bn(3, 2, 3),
    bn(4, 2),
    inorm(2, 2, 5),
    gn(2, 2, 4, 3),
    gn(1, 1, 3, 4),
    ln(1, 3, 5),
    ln(2, 2, 2, 3),
    rms(1, 3, 5),
    rms(2, 2, 2, 3),
]


def _numeric_grad(f, a):
    grad = np.empty(a.shape)
    flat = a.reshape(-1)  # a view: perturb in place
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + H
        plus = f()
        flat[i] = orig - H
        minus = f()
        flat[i] = orig
        grad.reshape(-1)[i] = (plus - minus) / (2 * H)
    return grad


@pytest.mark.parametrize(
    ("case", "layout"),
    [
        pytest.param(c, lay, id=f"{c}-{lay}")
        for c in CASES
        for lay in (("cf", "cl") if c.per_channel else ("cf",))  # channels_last: BN/IN/GN only
    ],
)
def test_backward_matches_finite_differences(case, layout):
    x_cf, dy_cf, w, b = data(case, np.float64, key=("fd",))
    x, cl = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    if case.kind == "rms_norm":
        b = None
    x = x.copy()
    spec = case.spec(cl)

    def loss():
        return float(np.sum(fastnorm.forward(x, spec, w, b)[0] * dy))

    _, stats = fastnorm.forward(x, spec, w, b)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    num_dx = _numeric_grad(loss, x)
    num_dw = _numeric_grad(loss, w)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-6, atol=1e-7)
    if b is not None:
        num_db = _numeric_grad(loss, b)
        np.testing.assert_allclose(db, num_db, rtol=1e-6, atol=1e-7)
    else:
        assert db is None

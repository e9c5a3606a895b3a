"""The torch baseline: the same pass in ``torch.nn.functional`` (the caller passes the torch module)."""

from __future__ import annotations

import numpy as np

from ..cases import EPS, KINDS, RMS_EPS, group_count


def _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats):
    """Build the torch callable of ``case`` (the :mod:`benchmarks` docstring describes the baselines)."""
    functional = torch.nn.functional
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    x_t = torch.from_numpy(x_logical).contiguous(memory_format=fmt)
    dy_t = torch.from_numpy(dy_logical).contiguous(memory_format=fmt)
    w_t = torch.from_numpy(weight)
    b_t = None if bias is None else torch.from_numpy(bias)
    kind = KINDS[case.kind]
    width = (case.shape[-1],)

    def norm(x, w, b):
        if kind == "batch_norm":
            return functional.batch_norm(x, None, None, w, b, training=True, eps=EPS)
        if kind == "instance_norm":
            return functional.instance_norm(x, weight=w, bias=b, eps=EPS)
        if kind == "group_norm":
            return functional.group_norm(x, group_count(case.shape[1]), w, b, EPS)
        if kind == "layer_norm":
            return functional.layer_norm(x, width, w, b, EPS)
        return functional.rms_norm(x, width, w, RMS_EPS)

    if case.pass_ == "bwd":
        leaves = [x_t.detach().requires_grad_(), w_t.detach().requires_grad_()]
        if b_t is not None:
            leaves.append(b_t.detach().requires_grad_())
        y = norm(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None)

        def torch_bwd():
            return torch.autograd.grad(y, leaves, dy_t, retain_graph=True)

        return torch_bwd

    if case.pass_ == "inf" and kind == "batch_norm":
        running_mean = torch.from_numpy(np.asarray(stats.mean, dtype=x_logical.dtype))
        running_var = torch.from_numpy((1.0 / np.square(stats.rstd) - EPS).astype(x_logical.dtype))

        def torch_inf():
            with torch.no_grad():
                return functional.batch_norm(
                    x_t, running_mean, running_var, w_t, b_t, training=False, eps=EPS
                )

        return torch_inf

    def torch_fwd():
        with torch.no_grad():
            return norm(x_t, w_t, b_t)

    return torch_fwd

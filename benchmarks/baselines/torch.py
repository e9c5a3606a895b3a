"""The torch baseline: the same pass in ``torch.nn.functional`` (the caller passes the torch module)."""

from __future__ import annotations

import numpy as np

from ..cases import EPS, KINDS, RMS_EPS, group_count


def _norm(torch, case):
    """``norm(x, w, b)``: the training forward of ``case``'s kind in ``torch.nn.functional``."""
    functional = torch.nn.functional
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

    return norm


def _tensor(torch, case, array):
    """``array`` (logical shape) as a torch tensor in ``case``'s memory format."""
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    return torch.from_numpy(array).contiguous(memory_format=fmt)


def _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats):
    """Build the torch callable of ``case`` (the :mod:`benchmarks` docstring describes the baselines)."""
    functional = torch.nn.functional
    x_t = _tensor(torch, case, x_logical)
    dy_t = _tensor(torch, case, dy_logical)
    w_t = torch.from_numpy(weight)
    b_t = None if bias is None else torch.from_numpy(bias)
    kind = KINDS[case.kind]
    norm = _norm(torch, case)

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


def _torch_epilogue_callable(torch, case, x_logical, other_logical, dy_logical, weight, bias, skip_bias):
    """Torch's unfused composite of an epilogue case (:data:`~benchmarks.cases.EPILOGUE_PASSES`).

    ``resrelu``: ``relu(norm(x) + residual)``; ``silu``: ``silu(norm(x))``;
    ``skip``: ``norm(x + skip + skip_bias)`` (``other_logical`` is the residual
    or the skip).  ``_fwd`` runs it without autograd, ``_fb`` runs it and
    ``autograd.grad`` of every input and parameter.
    """
    functional = torch.nn.functional
    epilogue, suffix = case.pass_.split("_")
    norm = _norm(torch, case)
    tensors = [_tensor(torch, case, x_logical), torch.from_numpy(weight)]
    tensors.append(None if bias is None else torch.from_numpy(bias))
    if other_logical is not None:
        tensors.append(_tensor(torch, case, other_logical))
    if skip_bias is not None:
        tensors.append(torch.from_numpy(skip_bias))
    dy_t = _tensor(torch, case, dy_logical)

    def composite(x, w, b, other=None, sb=None):
        if epilogue == "resrelu":
            return functional.relu(norm(x, w, b) + other)
        if epilogue == "silu":
            return functional.silu(norm(x, w, b))
        return norm(x + other + sb, w, b)

    if suffix == "fwd":

        def torch_fwd():
            with torch.no_grad():
                return composite(*tensors)

        return torch_fwd
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]

    def torch_fb():
        y = composite(*leaves)
        return torch.autograd.grad(y, [t for t in leaves if t is not None], dy_t)

    return torch_fb

"""The torch baseline: the same pass in ``torch.nn.functional`` (the caller passes the torch module).

16-bit data (bfloat16, float16) run torch's own CPU kernels for that dtype in
torch's "mixed" mode, as fastnorm's cases do: the tensors in the 16-bit dtype,
weight, bias and BatchNorm's running statistics in float32.  torch 2.13 accepts
mixed parameters on the CPU for all five norms and both 16-bit dtypes, forward
and backward (``F.batch_norm`` in inference then takes float32 running
statistics too).  ``F.rms_norm`` warns that mixed dtypes cannot take its fused
path and runs its composite instead; the warning is silenced: at (4096, 768) the
composite measured within noise of the all-bfloat16 call, forward 2.41 vs 2.26
ms and backward 20.6 vs 24.3 ms (medians of 11 interleaved rounds, 2 threads).
:func:`half_baseline_reason` says when torch has no CPU kernel for a case (none
in torch 2.13).
"""

from __future__ import annotations

import warnings

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


def from_numpy(torch, array):
    """``torch.from_numpy(array)``, also for bfloat16 (``ml_dtypes``) arrays, which it refuses.

    Parameters
    ----------
    torch : module
    array : numpy.ndarray

    Returns
    -------
    torch.Tensor
        Sharing ``array``'s memory; a bfloat16 array goes through its ``int16`` view.
    """
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor):
    """Return a CPU tensor's values as a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``).

    Parameters
    ----------
    tensor : torch.Tensor

    Returns
    -------
    numpy.ndarray
    """
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def half_baseline_reason(torch, case):
    """Why torch has no baseline for a 16-bit ``case``, or ``None`` when it has one.

    Tries the pass once on a tiny tensor of the case's kind, layout and dtype
    (mixed float32 parameters): a ``RuntimeError`` such as ``"... not
    implemented for 'Half'"`` is the reason.

    Parameters
    ----------
    torch : module
    case : Case

    Returns
    -------
    str or None
    """
    if not case.half:
        return None
    tiny = (2, 32, 3, 3) if case.kind not in ("ln", "rms") else (2, case.shape[-1])
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    x = torch.randn(tiny).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = torch.rand(tiny[1] if len(tiny) == 4 else tiny[-1]).requires_grad_()
    b = torch.zeros_like(w).requires_grad_()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = _norm(torch, case)(x, w, b)
            if case.pass_ == "bwd":
                torch.autograd.grad(y, [x, w], torch.ones_like(y))
    except RuntimeError as exc:
        return f"torch {torch.__version__} has no CPU {case.dtype} kernel here: {str(exc).splitlines()[0]}"
    return None


def _tensor(torch, case, array):
    """``array`` (logical shape) as a torch tensor in ``case``'s memory format."""
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    return from_numpy(torch, array).contiguous(memory_format=fmt)


def _quiet_mixed_rms_norm(case):
    """Silence ``F.rms_norm``'s warning that mixed dtypes skip its fused path (module docstring)."""
    if case.half and case.kind == "rms":
        warnings.filterwarnings(
            "ignore", message="Mismatch dtype between input and weight", category=UserWarning
        )


def _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats):
    """Build the torch callable of ``case`` (the :mod:`benchmarks` docstring describes the baselines).

    A 16-bit case runs in torch's mixed mode (module docstring); call it only
    where :func:`half_baseline_reason` is ``None``.
    """
    functional = torch.nn.functional
    _quiet_mixed_rms_norm(case)
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
        stat_dtype = weight.dtype  # float32 with 16-bit data: torch's mixed mode needs that
        running_mean = torch.from_numpy(np.asarray(stats.mean, dtype=stat_dtype))
        running_var = torch.from_numpy((1.0 / np.square(stats.rstd) - EPS).astype(stat_dtype))

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

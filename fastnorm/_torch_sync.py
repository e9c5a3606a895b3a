"""``fastnorm.torch.SyncBatchNorm``: BatchNorm synchronized over a ``torch.distributed`` group (CPU, gloo).

The pipeline is :mod:`fastnorm.distributed`'s: local moments, an
``all_gather`` of ``2C + 1`` doubles per rank, a merge in rank order, the
normalize pass; backward: local sums, an ``all_gather`` of ``2C`` doubles, a
sum in rank order, ``dx`` with the global count.  Imported by
:mod:`fastnorm.torch`, which exports its names.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from . import distributed as _split
from .spec import NormSpec, check_eps
from .torch import (
    _array,
    _BatchNorm,
    _check_inputs,
    _kernel_layout,
    _np_functional,
    _tensor,
)

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _gloo_allgather(group):
    """Return an ``allgather`` for :func:`fastnorm.distributed.sync_forward` over ``group`` (rank order)."""
    world = dist.get_world_size(group)

    def allgather(buffer):
        local = torch.from_numpy(np.ascontiguousarray(buffer, np.float64))
        rows = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(rows, local, group=group)
        return torch.stack(rows).numpy()

    return allgather


class _SyncBatchNormFunction(torch.autograd.Function):
    """Autograd of the synchronized pass: forward and backward each gather once per call (twice forward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, factor, group):
        x = _kernel_layout(x, x, "batch_norm")
        spec = NormSpec.batch_norm(eps)
        allgather = _gloo_allgather(group)
        running = {}
        if running_mean is not None:
            running = {"running_mean": _array(running_mean), "running_var": _array(running_var)}
        y, state = _split.sync_forward(
            _array(x), spec, _array(weight), _array(bias), allgather, momentum=factor, **running
        )
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.spec, ctx.allgather = state, spec, allgather
        return _tensor(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = _kernel_layout(dy, x, "batch_norm")
        dx, _, _, local_dy, local_dy_xhat = _split.sync_backward(
            _array(dy), _array(x), ctx.state, ctx.spec, _array(weight), ctx.allgather
        )
        # The parameters' gradients are this rank's sums, as torch's SyncBatchNorm returns them:
        # DistributedDataParallel reduces them across ranks like every other parameter's.
        param_dtype = weight.dtype if weight is not None else torch.float32
        dweight = torch.from_numpy(local_dy_xhat).to(param_dtype) if ctx.needs_input_grad[1] else None
        dbias = torch.from_numpy(local_dy).to(param_dtype) if ctx.needs_input_grad[2] else None
        return _tensor(dx), dweight, dbias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on CPU tensors: BatchNorm over the batch of every rank of a process group.

    torch's own refuses CPU tensors.  This one synchronizes over any
    ``torch.distributed`` group (gloo on CPU), bitwise identically on every
    rank; see ``docs/distributed.md``.  Same constructor arguments, parameters,
    buffers and ``state_dict`` as torch's, plus ``activation=`` and
    ``negative_slope=``.  Outside training, or when ``torch.distributed`` is
    not initialized or the group has one rank, it is :class:`BatchNorm2d`'s
    pass (no communication).

    It is not a subclass of ``torch.nn.SyncBatchNorm``:
    ``DistributedDataParallel`` refuses those on CPU.

    Parameters
    ----------
    num_features : int
        ``C``, the channels.
    eps, momentum, affine, track_running_stats, device, dtype
        As in ``torch.nn.SyncBatchNorm``.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks whose batches are normalized together; the default group
        by default.
    activation, negative_slope
        The epilogue (see :class:`fastnorm.NormSpec`).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            activation=activation,
            negative_slope=negative_slope,
        )
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(batch_norm(input) + residual)`` with the statistics of the global batch.

        Parameters
        ----------
        input : torch.Tensor
            This rank's ``(N, C, *spatial)`` samples, any memory format; ``N``
            may differ between ranks, and be 0.
        residual : torch.Tensor, optional
            Added after the affine transform (``input``'s shape).

        Returns
        -------
        torch.Tensor
            Of ``input``'s shape, dtype and memory format.
        """
        self._check_input_dim(input)
        need_sync = self.training and dist.is_available() and dist.is_initialized()
        group = self.process_group or (dist.group.WORLD if need_sync else None)
        if not need_sync or dist.get_world_size(group) == 1:
            return super().forward(input, residual)  # BatchNorm's pass, no communication
        epilogue = (residual, self.activation, self.negative_slope)
        negative_slope = _check_inputs(input, self.weight, self.bias, *epilogue)
        track = self.track_running_stats
        momentum = _np_functional._check_momentum(self.momentum, allow_none=True)
        factor = momentum if momentum is not None else 0.0
        if track:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if track else (None, None)
        eps = check_eps(self.eps)
        y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, *running, eps, factor, group)
        # The epilogue runs unfused here, as torch operations (autograd differentiates them).
        if residual is not None:
            y = y + residual
        return _activate(y, self.activation, negative_slope)


def _activate(y, activation, negative_slope):
    """``activation(y)`` as a torch operation (:data:`fastnorm.spec.ACTIVATION_NAMES`)."""
    from .torch import _TORCH_ACTIVATIONS

    if activation is None:
        return y
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, negative_slope)
    return _TORCH_ACTIVATIONS[activation](y)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Replace every BatchNorm module of ``module`` (itself included) by a :class:`SyncBatchNorm`.

    torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and fastnorm's
    BatchNorm modules are all converted; each new module holds the very same
    parameter and buffer tensors (an optimizer built before still updates
    them), the training mode and, for fastnorm's, the activation.

    Parameters
    ----------
    module : torch.nn.Module
        The model (or a single BatchNorm module).
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; the default group by default.

    Returns
    -------
    torch.nn.Module
        ``module`` with its BatchNorm children replaced, or the new module when
        ``module`` itself is a BatchNorm.
    """
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return _sync_copy(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _sync_copy(bn, process_group):
    """Return a :class:`SyncBatchNorm` sharing the parameters and buffers of ``bn``."""
    sync = SyncBatchNorm(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        process_group,
        activation=getattr(bn, "activation", None),
        negative_slope=getattr(bn, "negative_slope", 0.01),
    )
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    if hasattr(bn, "qconfig"):
        sync.qconfig = bn.qconfig
    return sync

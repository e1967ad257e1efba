"""An elementwise function whose value and derivative were computed together, without a graph.

For a per-token loss ℓ(x) evaluated under ``torch.no_grad()`` together with its derivative
ℓ'(x), `with_known_gradient` returns a tensor with the value ℓ whose gradient with respect to
``x`` is ``grad · ℓ'``. The backward pass is one multiplication instead of the chain of
``exp`` / ``clamp`` / ``maximum`` / ``where`` backward nodes autograd would record, and the only
tensor kept for it is ℓ'. Second derivatives are not available through it (``backward`` with
``create_graph=True`` raises).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _KnownGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(derivative)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (derivative,) = ctx.saved_tensors
        return grad * derivative, None, None


def with_known_gradient(x: torch.Tensor, value: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor:
    """``value`` (computed without a graph), with ∂value/∂x = ``derivative`` elementwise.

    All three tensors have the same shape; ``value`` and ``derivative`` must not require grad.
    Without a gradient to record (grad mode off, or ``x`` not requiring grad) ``value`` is returned.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return value
    return _KnownGradient.apply(x, value, derivative)

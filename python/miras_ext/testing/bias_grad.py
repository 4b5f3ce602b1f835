"""miras_ext::bias_grad: dl/dy of an attentional bias, and its backward (a test op: miras_ext.testing)."""

from __future__ import annotations

import torch


def bias_grad(y: torch.Tensor, v: torch.Tensor, bias: str, delta: torch.Tensor | None = None,
              p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Gradient g = dl/dy of the inner loss ``bias`` (docs/math.md, Section 2), row by row.

    Args:
        y: predictions, shape [..., Dv]; float64, float32, bfloat16 or float16 (the last two are
            computed in float32 and returned in their own dtype).
        v: values, same shape, dtype and device as y.
        bias: one of "dot", "l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift".
        delta: threshold, needed by "huber", "huber_norm", "yaad" and "value_shift" and ignored by the
            rest: shape [...] (one per row) or, for "huber" only, [..., Dv] (one per channel).
        p: exponent of "lp", at least 1 ("l1" always uses 1).
        eps: smoothing of "lp", "l1", "yaad" and "value_shift", greater than 0.

    Returns:
        g, shape [..., Dv], dtype of y. Differentiable in y, v and delta.

    Raises:
        ValueError naming the offending argument.
    """
    return torch.ops.miras_ext.bias_grad(y, v, delta, bias, float(p), float(eps))


@torch.library.register_fake("miras_ext::bias_grad")
def _bias_grad_fake(y, v, delta, bias, p, eps):
    return torch.empty_like(y)


@torch.library.register_fake("miras_ext::bias_grad_backward")
def _bias_grad_backward_fake(grad, y, v, delta, bias, p, eps):
    grad_delta = torch.empty_like(delta) if delta is not None else y.new_empty(0)
    return torch.empty_like(y), torch.empty_like(v), grad_delta


def _setup_context(ctx, inputs, output):
    y, v, delta, bias, p, eps = inputs
    ctx.save_for_backward(y, v, delta)
    ctx.options = (bias, p, eps)


def _backward(ctx, grad):
    y, v, delta = ctx.saved_tensors
    grad_y, grad_v, grad_delta = torch.ops.miras_ext.bias_grad_backward(grad, y, v, delta, *ctx.options)
    return grad_y, grad_v, (grad_delta if delta is not None else None), None, None, None


torch.library.register_autograd("miras_ext::bias_grad", _backward, setup_context=_setup_context)


def _backward_backward(ctx, *grads):
    # Second derivatives need third derivatives of the loss wrt y, v and delta, which nothing computes yet;
    # registering this makes double backward fail loudly instead of silently treating them as zero.
    raise NotImplementedError("miras_ext.bias_grad: second derivatives (double backward) are not implemented")


torch.library.register_autograd("miras_ext::bias_grad_backward", _backward_backward)

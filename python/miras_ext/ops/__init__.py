"""Python entry points of the torch.ops.miras_ext operators, with their fake and autograd registrations."""

from .bias_grad import bias_grad

__all__ = ["bias_grad"]

"""Operators that exist to test the compiled code, not to build models: ``bias_grad`` exposes the attentional
biases' gradients (csrc/common/bias.h) on their own, so each formula's CPU and CUDA backends can be checked
against reference.bias row by row. Importing this module registers the op's fake and autograd."""

from .bias_grad import bias_grad

__all__ = ["bias_grad"]

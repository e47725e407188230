"""The guided latent update (docs/algorithm.md, "Guided latent update").

For the early steps the sample is pulled towards the previous frame's clean-sample prediction:

    x_(t-1)  <-  x_(t-1)  -  delta * grad g,     g = mean((x0_hat^i(t) - x0_hat^(i-1)(t))^2)

Two ways to take the gradient:

* ``x0`` (default, as the official code): with respect to a detached x0_hat, in closed form,
  ``grad g = (2 / N) (x0_hat^i - x0_hat^(i-1))``; no backward pass.
* ``autograd`` (the paper's notation): with respect to x_t, through the UNet; one backward pass
  per updated step.

g is the *mean* squared error in both modes (the official code's loss), so ``delta`` means the
same thing in both.

The mean divides by N, the number of latent values, so one step moves the sample by
``2 delta / N`` of the x0 difference: the pull would depend on the working size. The paper's
delta = 100 is tuned at 512x512 (N = 4 x 64 x 64 = 16384); :func:`size_scaled_delta` applies
``delta * N / 16384``, so ``--update-delta`` is the paper's pull at every size and aspect, and
at 512x512 it is delta itself, bit for bit.
"""

from __future__ import annotations

import torch

# Latent values at the paper's working size, 512x512: 4 channels x 64 x 64.
PAPER_LATENT_VALUES = 4 * 64 * 64


def size_scaled_delta(delta: float, latent_values: int) -> float:
    """The step size that pulls each latent value as hard as ``delta`` does at 512x512."""
    return delta * (latent_values / PAPER_LATENT_VALUES)


def x0_gradient(x0_hat, x0_previous):
    """Closed-form gradient of the mean squared distance with respect to x0_hat."""
    difference = x0_hat.float() - x0_previous.float()
    return (2.0 / difference.numel()) * difference


def apply_update(sample, gradient, delta: float):
    """One guided step: move the sample against the gradient, in the sample's dtype."""
    return (sample.float() - delta * gradient.float()).to(sample.dtype)


def autograd_gradient(sample_in, x0_hat, x0_previous):
    """Gradient of the mean squared distance with respect to x_t (``sample_in`` requires grad).

    The backward pass runs through an fp16 UNet on CUDA, where the mean's tiny per-element
    gradients (about 1e-5) would fall into subnormals: differentiate the *sum* and divide in fp32.
    """
    squared_sum = (x0_hat.float() - x0_previous.float()).pow(2).sum()
    (gradient,) = torch.autograd.grad(squared_sum, sample_in)
    return gradient.float() / x0_hat.numel()

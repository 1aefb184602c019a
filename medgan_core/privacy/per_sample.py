"""Per-sample gradients of Conv2d layers, computed the faster of Opacus' two exact ways.

Opacus computes a convolution's per-sample weight gradients by unfolding the layer's input
into patches and multiplying by the output gradients. On wide images with few channels (a
U-Net's full-resolution layers) the unfolded copy is large and that product is slow on a
CPU; writing the same gradient as one grouped convolution of the input with the output
gradients (Opacus' ``convolution2d_backward_as_a_convolution``) takes about half the time
there. Deeper layers (few positions, many channels) are faster unfolded. Both give the same
per-sample gradients, so clipping, noise and the privacy analysis are unchanged; only which
exact formula runs differs.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample, convolution2d_backward_as_a_convolution
from torch import nn

# Output positions from which the grouped-convolution form wins (measured on 2 CPU cores,
# batches of 32–64, benchmarks/results/speed): 32×32 and larger at stride 1.
WIDE_OUTPUT = 32 * 32


def takes_convolution_form(layer: nn.Conv2d, backprops: torch.Tensor) -> bool:
    """Whether ``layer``'s per-sample gradients are computed as a grouped convolution: a plain
    (stride 1, no dilation, one group, numeric padding) layer with a wide output."""
    return (
        layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and not isinstance(layer.padding, str)
        and backprops.shape[-1] * backprops.shape[-2] >= WIDE_OUTPUT
    )


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``layer``'s weight and bias, by whichever exact form is faster."""
    if activations[0].shape[0] > 0 and takes_convolution_form(layer, backprops):
        grads = convolution2d_backward_as_a_convolution(layer, [activations[0].to(backprops.dtype)], backprops)
        if layer.bias is None or not layer.bias.requires_grad:
            grads.pop(layer.bias, None)
        if not layer.weight.requires_grad:
            grads.pop(layer.weight, None)
        return grads
    return compute_conv_grad_sample(layer, activations, backprops)


class FastConvGradSampleModule(GradSampleModule):
    """Opacus' ``GradSampleModule`` with Conv2d per-sample gradients by ``conv2d_grad_sample``;
    every other layer as Opacus does it."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}

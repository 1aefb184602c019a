"""Per-sample gradients of Conv2d layers by the fastest exact form, and a DP backward without weight gradients.

Opacus computes a convolution's per-sample weight gradients by unfolding the layer's input
into patches and multiplying by the output gradients. On wide images (a U-Net's
full-resolution layers) the unfolded copy is large and that product is slow on a CPU. There
PyTorch's own weight-gradient kernel, called once per record, is 4–7× faster
(``takes_loop_form``); on small layers, where the calls' overhead dominates, one grouped
convolution of the input with the output gradients (Opacus'
``convolution2d_backward_as_a_convolution``) or the unfolded product is. Every form gives the
same per-sample gradients, so clipping, noise and the privacy analysis are unchanged; only
which exact formula runs differs.

Opacus also stores each layer's first per-sample gradients of a batch by allocating a zeroed
buffer and copying them in; ``FastConvGradSampleModule`` keeps the tensor the formula made
instead (when it is the whole batch and shares no memory with the layer's activations or
output gradients), which spares a zero-fill and a copy of every per-sample gradient, a
fifth of a DP discriminator step. Later passes through the same layer still add up.

Under DP the optimiser clips and noises per-sample gradients only; the ordinary gradient of
every weight, which a plain ``loss.backward()`` also computes, is thrown away.
``FastConvGradSampleModule.backward`` asks autograd for the gradient of each first layer's
output instead (a layer none of whose inputs has a gradient: on the data), or of an input
that came with one (another network's output): every layer between them and the loss still
passes its output gradient to its per-sample hook, and no weight gradient is computed (in
this network, or in a network the loss reaches it through), nor a gradient of the data. It
checks that every trainable layer's hook fired.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample, convolution2d_backward_as_a_convolution
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.utils.module_utils import requires_grad, trainable_parameters
from torch import nn

from medgan_core.privacy.ghost import add_ghost_pass, drop_ghost, has_ghost, promote_ghost, takes_ghost_form

# Output positions from which the grouped-convolution form wins (measured on 2 CPU cores,
# batches of 32–64, benchmarks/results/speed): 32×32 and larger at stride 1.
WIDE_OUTPUT = 32 * 32
# Where one weight-gradient call per record beats both on a CPU (2 cores, batches of 16–64):
# 16→16 channels, 3×3, 64×64 positions: 4.1 ms against 17 (grouped) and 28 (unfolded), the
# ordinary batched gradient 2.7; below about 6 M multiply-adds a record the calls' overhead wins.
LOOP_POSITIONS = 16 * 16
LOOP_WORK = 6_000_000


def takes_convolution_form(layer: nn.Conv2d, backprops: torch.Tensor) -> bool:
    """Whether ``layer``'s per-sample gradients are computed as a grouped convolution: a plain
    (stride 1, no dilation, one group, numeric zero padding) layer with a wide output."""
    return (
        layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
        and backprops.shape[-1] * backprops.shape[-2] >= WIDE_OUTPUT
    )


def takes_loop_form(layer: nn.Conv2d, backprops: torch.Tensor) -> bool:
    """Whether ``layer``'s per-sample weight gradients are computed one record at a time by the
    ordinary weight-gradient kernel: on a CPU, a numerically padded layer with at least
    ``LOOP_POSITIONS`` output positions and ``LOOP_WORK`` multiply-adds per record."""
    positions = backprops.shape[-1] * backprops.shape[-2]
    patch = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return (
        backprops.device.type == "cpu"
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
        and positions >= LOOP_POSITIONS
        and positions * patch * layer.out_channels >= LOOP_WORK
    )


def per_record_weight_gradients(layer: nn.Conv2d, activation: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Each record's weight gradient of ``layer`` by PyTorch's own weight-gradient kernel, one
    record at a time: no unfolded copy of the input, and the kernel's blocking at full size."""
    out = torch.empty((backprops.shape[0], *layer.weight.shape), dtype=backprops.dtype, device=backprops.device)
    activation = activation.to(backprops.dtype)
    for i in range(backprops.shape[0]):
        out[i] = torch.nn.grad.conv2d_weight(activation[i : i + 1], layer.weight.shape, backprops[i : i + 1],
                                             layer.stride, layer.padding, layer.dilation, layer.groups)
    return out


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``layer``'s weight and bias, by whichever exact form is faster."""
    if activations[0].shape[0] > 0 and takes_loop_form(layer, backprops):
        grads: Dict[nn.Parameter, torch.Tensor] = {}
        if layer.weight.requires_grad:
            grads[layer.weight] = per_record_weight_gradients(layer, activations[0], backprops)
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = backprops.sum(dim=(2, 3))
        return grads
    if activations[0].shape[0] > 0 and takes_convolution_form(layer, backprops):
        grads = convolution2d_backward_as_a_convolution(layer, [activations[0].to(backprops.dtype)], backprops)
        grads[layer.weight] = grads[layer.weight].contiguous()  # clipping reads it flat, twice
        if layer.bias is None or not layer.bias.requires_grad:
            grads.pop(layer.bias, None)
        if not layer.weight.requires_grad:
            grads.pop(layer.weight, None)
        return grads
    return compute_conv_grad_sample(layer, activations, backprops)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def full_precision_factors(activations: List[torch.Tensor], backprops: torch.Tensor
                           ) -> tuple[List[torch.Tensor], torch.Tensor]:
    """A layer's inputs and output gradients in float32 when a low-precision forward pass
    (``task.precision = "bf16"``) made them, for a weight clipped from its factors (``ghost``):
    there a record's norm (Gram matrices) and its share of the clipped sum (the batched weight
    gradient) are two different computations, which agree to float32 rounding but not to
    bfloat16's; a norm short of the summed gradient's would let a record past the clipping
    bound the noise is calibrated to. (A materialised per-sample gradient may stay bfloat16:
    its norm and its clipped sum are both taken in float32 from the same values.)"""
    if backprops.dtype in LOW_PRECISION:
        backprops = backprops.float()
    return [a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION else a
            for a in activations], backprops


def _shares_memory(tensor: torch.Tensor, others: List[torch.Tensor]) -> bool:
    pointer = tensor.untyped_storage().data_ptr()
    return any(pointer == other.untyped_storage().data_ptr() for other in others)


def store_grad_sample(param: torch.Tensor, grad_sample: torch.Tensor, batch: int, inputs: List[torch.Tensor]) -> None:
    """Add ``grad_sample`` to ``param``'s per-sample gradients of this batch (Opacus'
    ``create_or_accumulate_grad_sample``), keeping the tensor itself when it is the first,
    covers the whole batch and is nobody else's memory (``inputs``: activations and output
    gradients, which autograd still uses)."""
    if not param.requires_grad:
        return
    if hasattr(param, "_current_grad_sample"):
        param._current_grad_sample[: grad_sample.shape[0]] += grad_sample
    elif grad_sample.shape[0] == batch and not _shares_memory(grad_sample, inputs):
        param._current_grad_sample = grad_sample
    else:
        param._current_grad_sample = torch.zeros((batch, *grad_sample.shape[1:]), device=grad_sample.device,
                                                 dtype=grad_sample.dtype)
        param._current_grad_sample[: grad_sample.shape[0]] = grad_sample


class FastConvGradSampleModule(GradSampleModule):
    """Opacus' ``GradSampleModule`` with Conv2d per-sample gradients by ``conv2d_grad_sample``
    or, for a deep convolution's weight, its factors (``ghost``; every other layer as Opacus
    computes it), no zeroed copy of each first gradient, and ``backward`` without weight gradients."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        #: Where ``backward`` asks for gradients, besides each first layer's output (held on the
        #: layer, ``_stop_outputs``): inputs of the passes since the last one that came with a
        #: gradient (held weakly: a task that calls ``loss.backward()`` itself frees them with
        #: its graph), and the parameters of trainable layers none of whose inputs has one and
        #: whose output has none either.
        self._input_leaves: list[weakref.ref[torch.Tensor]] = []
        self._layer_leaves: dict[int, nn.Parameter] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module on its inputs; an input that already has a gradient (another network's
        output) is a place ``backward`` asks for gradients, when this pass records per-sample
        gradients."""
        if self.hooks_enabled and self.training and torch.is_grad_enabled():
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    self._input_leaves = [ref for ref in self._input_leaves if ref() is not None]
                    self._input_leaves.append(weakref.ref(value))
        return super().forward(*args, **kwargs)

    def capture_activations_hook(self, module: nn.Module, forward_input: List[torch.Tensor],
                                 forward_output: torch.Tensor) -> None:
        """Opacus' hook; a trainable layer none of whose inputs has a gradient (a first layer on
        the data, an embedding of labels) is where ``backward`` stops: at its output as the layer
        made it (this hook sees it before the backward hook wraps it), so the wrapper's backward,
        which fires the per-sample hook, runs and the layer's own backward does not (neither an
        input nor a weight gradient); at its parameters if that output has no gradient."""
        super().capture_activations_hook(module, forward_input, forward_output)
        if self.hooks_enabled and requires_grad(module) and module.training and torch.is_grad_enabled() \
                and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in forward_input):
            if isinstance(forward_output, torch.Tensor) and forward_output.grad_fn is not None:
                # Held as Opacus holds the activations: until this layer's hook fires.
                module.__dict__.setdefault("_stop_outputs", []).append(forward_output)
            else:
                self._layer_leaves.update((id(p), p) for _, p in trainable_parameters(module))

    def cleanup(self) -> None:
        """Opacus' removal of its hooks and attributes, and of the factors a weight holds."""
        super().cleanup()
        for param in self._module.parameters():
            drop_ghost(param)
        for module in self._module.modules():
            module.__dict__.pop("_stop_outputs", None)

    def backward(self, loss: torch.Tensor) -> None:
        """Per-sample gradients of ``loss`` for every trainable layer of this network, without
        the ordinary weight gradients the private optimiser would discard."""
        leaves = [leaf for leaf in (ref() for ref in self._input_leaves) if leaf is not None]
        leaves += self._layer_leaves.values()
        for module in self._module.modules():
            leaves += module.__dict__.pop("_stop_outputs", [])
        self._input_leaves, self._layer_leaves = [], {}
        if not leaves:
            loss.backward()
            return
        torch.autograd.grad(loss, leaves, allow_unused=True)
        for name, param in trainable_parameters(self._module):
            if getattr(param, "_forward_counter", 0) != 0:
                raise RuntimeError(f"{name}: its per-sample gradient hook did not fire in every pass; "
                                   "its layer is not between the network's inputs and the loss")

    @staticmethod
    def _ghost_form(layer: nn.Conv2d, backprops: torch.Tensor) -> bool:
        """Whether this pass keeps ``layer``'s weight as factors: as its earlier passes since the
        last step did (one record's gradient is one form, or part of it would go unclipped),
        else where ``takes_ghost_form`` says it is cheaper."""
        weight = layer.weight
        if hasattr(weight, "_ghost_current") or has_ghost(weight):
            return True
        if hasattr(weight, "_current_grad_sample") or getattr(weight, "grad_sample", None) is not None:
            return False
        return not takes_convolution_form(layer, backprops) and takes_ghost_form(layer, backprops)

    def capture_backprops_hook(self, module: nn.Module, _forward_input: torch.Tensor, forward_output: torch.Tensor,
                               loss_reduction: str, batch_first: bool) -> None:
        """Opacus' hook (``GradSampleModule.capture_backprops_hook``, opacus 1.5–1.6), storing
        with ``store_grad_sample``."""
        if not self.hooks_enabled:
            return
        stops = module.__dict__.get("_stop_outputs")
        if stops:  # a backward this network's ``backward`` did not start (``loss.backward()``)
            stops.pop()
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction, batch_first=batch_first)
        kind = self._get_module_type(module)
        sampler = self.GRAD_SAMPLERS[kind] if not self.force_functorch and kind in self.GRAD_SAMPLERS \
            else ft_compute_per_sample_gradient
        with torch.autocast(backprops.device.type, enabled=False):
            if kind is nn.Conv2d and activations[0].shape[0] > 0 and self._ghost_form(module, backprops):
                activations, backprops = full_precision_factors(activations, backprops)
                add_ghost_pass(module.weight, module, activations[0], backprops)
                grad_samples = {module.bias: backprops.sum(dim=(2, 3))} \
                    if module.bias is not None and module.bias.requires_grad else {}
            else:  # in the output gradients' precision (a bfloat16 forward: bfloat16, norms taken in float32)
                activations = [a.to(backprops.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                               for a in activations]
                grad_samples = sampler(module, activations, backprops)
        inputs = [backprops, *activations]
        for param, grad_sample in grad_samples.items():
            store_grad_sample(param, grad_sample, module.max_batch_len, inputs)
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1
            if p._forward_counter == 0:
                if hasattr(p, "_current_grad_sample"):
                    promote_current_grad_sample(p)
                promote_ghost(p)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise ValueError("Poisson sampling is not compatible with grad accumulation. You need to call "
                                 "optimizer.step() after every forward/backward pass or consider using BatchMemoryManager")
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len

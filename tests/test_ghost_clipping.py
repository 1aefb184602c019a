"""Deep convolutions' weights clipped from their factors (``medgan_core.privacy.ghost``):
the clipped, noised gradient must be Opacus' own, whatever mix of layers, passes and views."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from medgan_core.privacy.ghost import GhostDPOptimizer, has_ghost, takes_ghost_form
from medgan_core.privacy.multiplicity import average_views
from medgan_core.privacy.per_sample import FastConvGradSampleModule


def _net(bias: bool = True) -> nn.Module:
    """16×16 in: a wide first layer (per-sample gradients), a deep 4×4 one (factors), a 1×1 head."""
    layers: list[nn.Module] = [nn.Conv2d(2, 32, 4, 2, 1, bias=bias), nn.LeakyReLU(0.2),
                               nn.Conv2d(32, 64, 4, 2, 1, bias=bias)]
    if bias:
        layers += [nn.GroupNorm(4, 64)]
    layers += [nn.LeakyReLU(0.2), nn.Conv2d(64, 1, 4, 1, 0, bias=bias)]
    return nn.Sequential(*layers)


def test_ghost_form_is_chosen_only_where_it_costs_less() -> None:
    deep, shallow = nn.Conv2d(32, 64, 4, 2, 1), nn.Conv2d(2, 32, 4, 2, 1)
    assert takes_ghost_form(deep, torch.zeros(1, 64, 4, 4))  # 16·(512 + 64) < 512·64
    assert not takes_ghost_form(deep, torch.zeros(1, 64, 32, 32))  # 1024·576 > 512·64
    assert not takes_ghost_form(shallow, torch.zeros(1, 32, 8, 8))
    assert not takes_ghost_form(nn.Conv2d(32, 64, 4, 2, 1, groups=2), torch.zeros(1, 64, 4, 4))
    assert not takes_ghost_form(nn.Conv2d(32, 64, 3, padding="same"), torch.zeros(1, 64, 4, 4))
    frozen = nn.Conv2d(32, 64, 4, 2, 1)
    frozen.weight.requires_grad_(False)
    assert not takes_ghost_form(frozen, torch.zeros(1, 64, 4, 4))


def _step(fast: bool, net: nn.Module, images: torch.Tensor, passes: int, views: int,
          max_grad_norm: float, backwards: int = 1) -> list[torch.Tensor]:
    """One private SGD step without noise; the gradient it applied to each parameter (read from
    ``.grad``: with lr = 1 it is the update, without the rounding of a difference of two float32
    weights, one ulp of the weight, which can exceed the tolerance on a small update)."""
    module = (FastConvGradSampleModule if fast else GradSampleModule)(net)
    wrapped = (GhostDPOptimizer if fast else DPOptimizer)(
        torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        expected_batch_size=images.shape[0] // views)
    wrapped.zero_grad(set_to_none=True)
    loss = module(images).square().mean()
    if passes == 2:  # a second pass of the same records through the same layers
        loss = loss + nn.functional.softplus(module(images.flip(-1) * 0.5)).mean()
    module.backward(loss) if fast else loss.backward()
    if backwards == 2:  # other records in a second backward before the step (Opacus stacks them)
        other = nn.functional.softplus(module(images[:4] * 0.5)).mean()
        module.backward(other) if fast else other.backward()
    if fast:
        assert has_ghost(net[2].weight)  # the deep layer really took the factor form
    average_views(module, views)
    before = [p.detach().clone() for p in net.parameters()]
    wrapped.step()
    applied = [p.grad.detach().clone() for p in net.parameters()]
    for b, p, g in zip(before, net.parameters(), applied):  # the step really applied it (to float32 rounding)
        atol = 1e-3 * g.abs().max().item() + torch.finfo(b.dtype).eps * b.abs().max().item()  # + the weight's ulp
        torch.testing.assert_close(b - p.detach(), g, rtol=0, atol=atol)
    module._close()
    return applied


@pytest.mark.parametrize("passes,views,bias,backwards", [(1, 1, True, 1), (2, 1, True, 1), (1, 3, True, 1),
                                                         (2, 2, False, 1), (2, 1, True, 2)])
@pytest.mark.parametrize("max_grad_norm", [0.02, 100.0])  # most records clipped / none
def test_clipped_step_equals_opacus(passes: int, views: int, bias: bool, backwards: int, max_grad_norm: float) -> None:
    torch.manual_seed(0)
    reference, fast = _net(bias), _net(bias)
    fast.load_state_dict(reference.state_dict())
    images = torch.randn(6, 2, 16, 16)
    expected = _step(False, reference, images, passes, views, max_grad_norm, backwards)
    got = _step(True, fast, images, passes, views, max_grad_norm, backwards)
    for (name, _), e, g in zip(fast.named_parameters(), expected, got):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)
    assert not any(hasattr(p, "ghost_factors") or hasattr(p, "_ghost_current") for p in fast.parameters())


def test_noise_is_added_to_every_parameter_kept_as_factors() -> None:
    """A network whose every clipped weight is kept as factors (no per-sample gradient
    anywhere) is still clipped and noised: Opacus' 'nothing to clip' shortcut must not fire."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 64, 4, 2, 1, bias=False))
    module = FastConvGradSampleModule(net)
    optimizer = GhostDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=1e-9, expected_batch_size=4)
    module.backward(module(torch.randn(4, 32, 8, 8)).mean())
    assert has_ghost(net[0].weight) and getattr(net[0].weight, "grad_sample", None) is None
    before = net[0].weight.detach().clone()
    optimizer.step()
    # The clipped signal is ~1e-9: what moved the weight is noise of std σC/B per coordinate.
    moved = (net[0].weight.detach() - before).std().item()
    assert 1e-10 * 0.5 < moved < 1e-10 * 2 * 2.5


@pytest.mark.parametrize("wide_first", [True, False])
def test_a_layer_seen_at_two_sizes_in_one_backward_keeps_one_form(wide_first: bool) -> None:
    """One layer applied at 4×4 output positions (the factor form's size) and at 32×32 (not)
    in one backward: each record's gradient must be all in one form, clipped whole."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Conv2d(32, 64, 4, 2, 1)

    reference, fast = net(), net()
    fast.load_state_dict(reference.state_dict())
    small, large = torch.randn(5, 32, 8, 8), torch.randn(5, 32, 64, 64) * 0.1
    updates = []
    for is_fast, layer in ((False, reference), (True, fast)):
        module = (FastConvGradSampleModule if is_fast else GradSampleModule)(layer)
        optimizer = (GhostDPOptimizer if is_fast else DPOptimizer)(
            torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=5)
        first, second = (large, small) if wide_first else (small, large)
        loss = module(first).square().mean() + module(second).mean()
        module.backward(loss) if is_fast else loss.backward()
        before = [p.detach().clone() for p in layer.parameters()]
        optimizer.step()
        updates.append([b - p.detach() for b, p in zip(before, layer.parameters())])
    for expected, got in zip(*updates):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

"""The per-sample gradients DP-SGD clips: the faster convolution form equals Opacus' own,
and a synthesis step clips each real and each generated image on its own, in one pass."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from medgan_core.data.dataset import SiteData
from medgan_core.errors import PrivacyError
from medgan_core.privacy import DPSettings, validate_private_modules
from medgan_core.privacy.ghost import GhostDPOptimizer, ghost_per_sample, has_ghost
from medgan_core.privacy.per_sample import FastConvGradSampleModule, takes_convolution_form, takes_loop_form
from medgan_core.tasks.registry import build_task, task_config


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 32×32 out, stride 1: the convolution form
        nn.GroupNorm(2, 4),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),  # wide, no bias: the convolution form
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 6, 4, stride=2, padding=1),  # strided: Opacus' unfolded form
        nn.LeakyReLU(0.2),
        nn.Conv2d(6, 6, 3, padding="same", groups=2),  # grouped, string padding: Opacus' own
        nn.Conv2d(6, 3, 3, padding=1),  # 16×16 out: Opacus' unfolded form
        nn.Flatten(),
        nn.Linear(3 * 16 * 16, 1),
    )


def test_convolution_form_is_chosen_only_for_wide_plain_layers() -> None:
    net = _net()
    wide, strided = torch.zeros(1, 4, 32, 32), torch.zeros(1, 6, 16, 16)
    assert takes_convolution_form(net[0], wide)
    assert takes_convolution_form(net[3], wide)
    assert not takes_convolution_form(net[5], strided)
    assert not takes_convolution_form(net[8], torch.zeros(1, 3, 16, 16))
    assert not takes_convolution_form(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), wide)


@pytest.mark.parametrize("passes", [1, 2])
def test_fast_per_sample_gradients_equal_opacus_own(passes: int) -> None:
    """One pass, and two through the same network in one backward (a pix2pix discriminator
    judging the real and the generated pair of each record: one summed gradient per record)."""
    torch.manual_seed(0)
    reference_net = _net()
    fast_net = _net()
    fast_net.load_state_dict(reference_net.state_dict())
    images = torch.randn(5, 2, 32, 32)
    gradients = []
    for wrapper, net in ((GradSampleModule, reference_net), (FastConvGradSampleModule, fast_net)):
        module = wrapper(net)
        loss = (module(images) ** 2).mean()
        if passes == 2:
            loss = loss + torch.nn.functional.softplus(module(images.flip(-1) * 0.5)).mean()
        loss.backward()
        gradients.append([p.grad_sample for p in module.parameters()])
        assert all(g.shape[0] == 5 for g in gradients[-1])
    for reference, fast in zip(*gradients):
        assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-5)
    # The summed per-sample gradients are the ordinary gradient.
    for p in fast_net.parameters():
        assert torch.allclose(p.grad_sample.sum(0) / 5, p.grad, rtol=1e-4, atol=1e-6)


def test_loop_form_is_chosen_for_wide_layers_with_much_work_a_record_on_a_cpu() -> None:
    wide = nn.Conv2d(16, 16, 3, padding=1)
    assert takes_loop_form(wide, torch.zeros(1, 16, 64, 64))  # 4096 · 144 · 16 = 9.4 M
    assert not takes_loop_form(wide, torch.zeros(1, 16, 32, 32))  # 2.4 M: the calls' overhead wins
    assert not takes_loop_form(nn.Conv2d(512, 512, 3, padding=1), torch.zeros(1, 512, 8, 8))  # few positions
    assert not takes_loop_form(nn.Conv2d(16, 16, 3, padding="same"), torch.zeros(1, 16, 64, 64))


@pytest.mark.parametrize("passes", [1, 2])
def test_loop_form_per_sample_gradients_equal_opacus_own(passes: int) -> None:
    """Wide layers (stride 1 and 2, with and without bias) by one weight-gradient call a record."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.LeakyReLU(0.2),
                             nn.Conv2d(32, 32, 4, stride=2, padding=1, bias=False), nn.Flatten(), nn.LazyLinear(1))

    reference_net, fast_net = net(), net()
    images = torch.randn(4, 8, 64, 64)
    reference_net(images), fast_net(images)  # materialise the lazy head
    fast_net.load_state_dict(reference_net.state_dict())
    assert takes_loop_form(fast_net[0], torch.zeros(1, 32, 64, 64))
    assert takes_loop_form(fast_net[2], torch.zeros(1, 32, 32, 32))
    gradients = []
    for wrapper, model in ((GradSampleModule, reference_net), (FastConvGradSampleModule, fast_net)):
        module = wrapper(model)
        loss = module(images).square().mean()
        if passes == 2:
            loss = loss + module(images.flip(-1)).mean()
        loss.backward()
        gradients.append([(name, p.grad_sample) for name, p in module.named_parameters()])
    for (name, reference), (_, fast) in zip(*gradients):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item(), msg=name)


def test_synthesis_clips_every_image_of_its_discriminator_step_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    config = task_config(name="synthesis", modality="CT", image_size=16, width=8, batch_size=4, z_dim=8)
    task = build_task(config)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 16, 16, generator=generator) * 2 - 1
    data = SiteData("site", images, images[:8])
    seen: list[tuple[int, list[object]]] = []
    clip = GhostDPOptimizer.clip_and_accumulate

    def recording(self: GhostDPOptimizer) -> None:
        seen.append((self.expected_batch_size, [ghost_per_sample(p) if has_ghost(p) else p.grad_sample
                                                for p in self.params]))
        clip(self)

    monkeypatch.setattr(GhostDPOptimizer, "clip_and_accumulate", recording)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, expected_batch_size=10, secure_rng=False)
    task.train(data, 4, seed=1, dp=dp)
    assert seen  # the discriminator stepped privately
    for expected, samples in seen:
        # One backward pass: a single tensor per parameter, one row per image, real
        # (Poisson batch) and generated (the expected batch's number) alike, each clipped on its own.
        assert all(isinstance(s, torch.Tensor) for s in samples)
        rows = {s.shape[0] for s in samples}
        assert len(rows) == 1 and expected <= rows.pop() <= expected + len(images)


def test_the_skip_discriminators_per_sample_gradients_are_each_images_own() -> None:
    """The multi-scale discriminator reads each image at every resolution through its own
    1×1 layers: the per-sample gradients DP-SGD clips must still be each image's alone."""
    from medgan_core.models.dcgan import DCGANDiscriminator

    torch.manual_seed(0)
    wrapped_net, reference = DCGANDiscriminator(32, 8, skips=True), DCGANDiscriminator(32, 8, skips=True)
    reference.load_state_dict(wrapped_net.state_dict())
    images = torch.randn(3, 1, 32, 32)
    module = FastConvGradSampleModule(wrapped_net)
    torch.nn.functional.softplus(module(images)).mean().backward()
    for i in range(3):
        reference.zero_grad()
        torch.nn.functional.softplus(reference(images[i : i + 1])).sum().backward()
        for (name, p), q in zip(module.named_parameters(), reference.parameters()):
            per_sample = ghost_per_sample(p) if has_ghost(p) else p.grad_sample
            torch.testing.assert_close(per_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_synthesis_with_skips_trains_privately_and_refuses_an_unknown_architecture(tiny_sites, tmp_path) -> None:
    from medgan_core.errors import ConfigError
    from medgan_core.privacy import SiteAccountant
    from medgan_core.tasks.registry import load_task_data

    config = task_config(name="synthesis", image_size=32, width=8, batch_size=8, z_dim=8, architecture="skips")
    task = build_task(config)
    assert task.generator.to_image is not None and task.discriminator.from_image is not None
    before = task.get_weights()
    accountant = SiteAccountant("rdp", 1e-5, tmp_path / "acc.json")
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, expected_batch_size=4, secure_rng=False)
    task.train(load_task_data(tiny_sites[0], config), 3, seed=0, dp=dp, accountant=accountant)
    assert accountant.steps == 3
    after = task.get_weights()
    assert any(not torch.equal(torch.from_numpy(before[n]), torch.from_numpy(after[n])) for n in before
               if "to_image" in n) and any("from_image" in n for n in after)
    with pytest.raises(ConfigError, match="task.architecture = 'progressive'; choose one of dcgan, skips"):
        task_config(name="conditional", architecture="progressive")


@pytest.mark.parametrize("mode", ["replicate", "reflect", "circular"])
def test_a_convolution_padded_other_than_with_zeros_is_refused_for_dp(mode: str) -> None:
    """Opacus (1.6) computes such a layer's per-sample gradients as if it were zero-padded:
    they do not add up to the layer's gradient, so clipping would bound the wrong vectors."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    module = GradSampleModule(net)
    (module(torch.randn(4, 2, 8, 8)) ** 2).mean().backward()
    assert not torch.allclose(net[0].weight.grad_sample.sum(0) / 4, net[0].weight.grad, atol=1e-6)  # the defect
    with pytest.raises(PrivacyError, match=f"generator.0 \\(Conv2d\\).*padding_mode='{mode}'"):
        validate_private_modules({"generator": net})


class _Conditioned(nn.Module):
    """A convolution on the image scaled by an embedding of a label: a trainable layer (the
    embedding) none of whose inputs has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2))
        self.embed = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images).mean(dim=(2, 3))
        return self.head(pooled * self.embed(labels))


@pytest.mark.parametrize("kind", ["plain", "two-passes", "conditioned", "learned-through", "fed-by-another"])
def test_dp_backward_gives_opacus_per_sample_gradients_and_no_weight_gradients(kind: str) -> None:
    """``FastConvGradSampleModule.backward`` asks autograd for input gradients only: the
    per-sample gradients must be those of an ordinary backward, every trainable layer's, and
    neither this network nor one the loss reaches it through gets an ordinary gradient (nor
    one that made its input: "fed-by-another", beside a pass on a fresh input)."""
    torch.manual_seed(0)
    make = _Conditioned if kind == "conditioned" else _net
    reference_net, fast_net = make(), make()
    fast_net.load_state_dict(reference_net.state_dict())
    judge = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.LazyLinear(1))
    producer = nn.Conv2d(2, 2, 3, padding=1)
    images = torch.randn(5, 1 if kind == "conditioned" else 2, 32, 32)
    labels = torch.tensor([0, 2, 1, 1, 0])
    gradients = []
    for fast, net in ((False, reference_net), (True, fast_net)):
        module = (FastConvGradSampleModule if fast else GradSampleModule)(net)
        if kind == "conditioned":
            loss = module(images, labels).square().mean()
        elif kind == "learned-through":  # a generator-like net judged by another, unwrapped one
            loss = judge(module(images)[:, :, None, None].expand(-1, 1, 8, 8)).mean()
        elif kind == "fed-by-another":  # one pass on another network's output, one on the data
            made = producer(images)
            loss = (module(made) ** 2).mean() + torch.nn.functional.softplus(module(images)).mean()
        else:
            loss = (module(images) ** 2).mean()
            if kind == "two-passes":
                loss = loss + torch.nn.functional.softplus(module(images.flip(-1) * 0.5)).mean()
        module.backward(loss) if fast else loss.backward()
        gradients.append([(name, p.grad_sample) for name, p in module.named_parameters()])
        if fast:
            assert all(p.grad is None for p in module.parameters())
            assert all(p.grad is None for p in judge.parameters())
            assert all(p.grad is None for p in producer.parameters())
        judge.zero_grad(set_to_none=True)
        producer.zero_grad(set_to_none=True)
    for (name, reference), (_, fast_sample) in zip(*gradients):
        assert fast_sample is not None, name
        torch.testing.assert_close(fast_sample, reference, rtol=1e-4, atol=1e-6, msg=name)


def test_dp_backward_runs_no_backward_of_a_first_layer() -> None:
    """A first layer's inputs (the data) need no gradient and, under DP, neither do its
    weights: its per-sample hook fires from its output gradient, and its own backward, which
    would compute an input or a weight gradient, never runs. The per-sample gradients are
    still Opacus' and the layer's output is not held after the backward."""
    torch.manual_seed(0)
    reference_net, fast_net = _net(), _net()
    fast_net.load_state_dict(reference_net.state_dict())
    images = torch.randn(4, 2, 32, 32)
    reference = GradSampleModule(reference_net)
    (reference(images) ** 2).mean().backward()
    fast = FastConvGradSampleModule(fast_net)
    first = next(m for m in fast_net.modules() if isinstance(m, nn.Conv2d))
    ran = []

    def watch(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.grad_fn.register_prehook(lambda *_: ran.append(1))

    first.register_forward_hook(watch)
    fast.backward((fast(images) ** 2).mean())
    assert ran == []
    assert "_stop_outputs" not in first.__dict__
    for (name, p), (_, q) in zip(reference.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(q.grad_sample, p.grad_sample, rtol=1e-4, atol=1e-6, msg=name)
        assert q.grad is None


def test_dp_backward_refuses_a_trainable_layer_the_loss_does_not_reach_from_the_inputs() -> None:
    net = nn.ModuleDict({"used": nn.Conv2d(1, 2, 3), "unused": nn.Conv2d(1, 2, 3)})

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = net

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.heads["used"](images), self.heads["unused"](images)

    module = FastConvGradSampleModule(TwoHeads())
    used, _ = module(torch.randn(3, 1, 8, 8))
    with pytest.raises(RuntimeError, match="heads.unused.weight"):
        module.backward(used.mean())


def test_a_task_that_calls_backward_itself_still_gets_per_sample_gradients_and_holds_no_inputs() -> None:
    """A task written against plain Opacus calls ``loss.backward()`` on the wrapped network: the
    per-sample gradients are still there, and the input leaves kept for ``backward`` die with
    the graph instead of piling up step after step."""
    module = FastConvGradSampleModule(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 1)))
    for _ in range(5):
        for p in module.parameters():
            p.grad_sample = None
        module(torch.randn(3, 1, 8, 8)).mean().backward()
        assert all(p.grad_sample.shape[0] == 3 for p in module.parameters())
    assert sum(ref() is not None for ref in module._input_leaves) == 0
    assert len(module._input_leaves) <= 1
    assert all(not m.__dict__.get("_stop_outputs") for m in module.modules())


@pytest.mark.parametrize("private", [False, True])
def test_learning_through_a_network_computes_no_gradient_for_it(private: bool) -> None:
    """G learning through D's judgement: G gets its gradient, D's weights none (the backward
    skips them), D's per-sample hooks record nothing; afterwards D is trainable again, except
    a weight that was frozen before."""
    from medgan_core.tasks.base import TrainingSetup

    torch.manual_seed(0)
    generator, plain_d = nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    plain_d[0].bias.requires_grad_(False)  # frozen for the round
    discriminator = FastConvGradSampleModule(plain_d) if private else plain_d
    setup = TrainingSetup(generator, discriminator, torch.optim.SGD(generator.parameters(), lr=0.1),
                          torch.optim.SGD(plain_d.parameters(), lr=0.1), torch.Generator(), torch.Generator())
    with setup.learning_through(discriminator):
        assert not any(p.requires_grad for p in plain_d.parameters())
        discriminator(generator(torch.randn(3, 4))).mean().backward()
    assert all(p.grad is not None for p in generator.parameters())
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in plain_d.parameters())
    assert [p.requires_grad for p in plain_d.parameters()] == [True, False, True, True]

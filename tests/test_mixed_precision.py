"""Mixed precision (``task.precision = "bf16"``): a training step's forward passes run under
bfloat16 autocast, while weights, gradients, Adam's state and DP-SGD's norms, clip factors,
clipped sums and noise stay float32 (a per-sample gradient may be bfloat16; its norm is taken
in float32 from the values that are summed), so the clipping bound the noise is calibrated to
holds exactly and ε is that of the same mechanism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medgan_core.errors import ConfigError
from medgan_core.privacy import DPSettings, SiteAccountant
from medgan_core.privacy.ghost import GhostDPOptimizer, has_ghost
from medgan_core.privacy.per_sample import FastConvGradSampleModule
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.base import TrainingSetup
from medgan_core.tasks.registry import build_task, load_task_data, replace_task, task_config, task_names

DP = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.6, expected_batch_size=8, secure_rng=False)


def _net() -> nn.Module:
    """16×16 in: a wide first layer (materialised per-sample gradients), a deep 4×4 one (clipped
    from its factors), GroupNorm, a 1×1 head: every per-sample path the DP engine has."""
    return nn.Sequential(nn.Conv2d(2, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 4, 2, 1),
                         nn.GroupNorm(4, 64), nn.LeakyReLU(0.2), nn.Conv2d(64, 1, 4, 1, 0))


def _clipped_sum(images: torch.Tensor, max_grad_norm: float, bf16: bool) -> list[torch.Tensor]:
    """One record's clipped gradient (noise-free) after a forward pass in bfloat16 or float32."""
    torch.manual_seed(0)
    net = _net()
    module = FastConvGradSampleModule(net)
    optimizer = GhostDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=max_grad_norm, expected_batch_size=1)
    setup = TrainingSetup(module, module, optimizer, optimizer, None, None,  # type: ignore[arg-type]
                          autocast_device="cpu" if bf16 else "")
    with setup.forward():
        out = module(images)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        loss = out.float().square().mean() * 1e3  # far past the bound: the record is clipped
        setup.backward(loss, module)
    assert has_ghost(net[2].weight)  # the deep layer really took the factor form
    for p in net.parameters():
        assert p.grad is None  # DP asked for per-sample gradients only
    optimizer.clip_and_accumulate()
    sums = [p.summed_grad.clone() for p in net.parameters()]
    module._close()
    return sums


def test_a_clipped_record_is_at_the_bound_exactly_after_a_bfloat16_forward() -> None:
    """The clip factor is computed from the norm of exactly what is summed: a record far past
    the bound ends at the bound to float32 rounding, not to bfloat16's (1 part in 256), which
    a norm taken from bfloat16 factors would miss by."""
    images = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    for bound in (0.05, 1.0):
        sums = _clipped_sum(images, bound, bf16=True)
        norm = torch.sqrt(sum(s.double().square().sum() for s in sums))
        assert all(s.dtype == torch.float32 for s in sums)
        assert norm.item() == pytest.approx(bound, rel=2e-6)


def test_the_bfloat16_step_follows_the_float32_one() -> None:
    """The clipped gradient after a bfloat16 forward is the float32 one to bfloat16's rounding:
    the same direction (cosine > 0.99 per weight), not merely the same norm."""
    images = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    half = _clipped_sum(images, 1.0, bf16=True)
    full = _clipped_sum(images, 1.0, bf16=False)
    for h, f in zip(half, full):
        assert torch.nn.functional.cosine_similarity(h.flatten(), f.flatten(), dim=0) > 0.99
        assert not torch.equal(h, f)  # the forward really ran in another precision


def _forward_dtypes(task: object) -> list[torch.dtype]:
    """The output dtype of every convolution (transposed too) of both networks, as each forward pass makes it."""
    seen: list[torch.dtype] = []
    for module in task.groups.values():  # type: ignore[attr-defined]
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("name", task_names())
def test_every_task_trains_in_bfloat16_with_and_without_dp(tiny_sites: list[Path], name: str) -> None:
    modality = "MR" if name == "recon" else "CT"
    config = task_config(name=name, modality=modality, image_size=16, width=8, batch_size=8, precision="bf16",
                         **({"z_dim": 8} if name in ("synthesis", "conditional") else {}))
    data = load_task_data(tiny_sites[1], config)
    for dp in (None, DP):
        task = build_task(config)
        before = task.get_weights()
        seen = _forward_dtypes(task)
        accountant = SiteAccountant()
        losses = task.train(data, steps=2, seed=3, dp=dp, accountant=accountant)
        assert torch.bfloat16 in seen, "the training forward passes ran in float32"
        after = task.get_weights()
        assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in after.values())
        changed = [k for k in after if not np.array_equal(after[k], before[k])]
        assert len(changed) >= len(after) // 2, changed
        assert all(np.isfinite(v) for v in losses.values()), losses
        state = task.optimizer_state()
        assert state and all(a.dtype == np.float32 for k, a in state.items() if "exp_avg" in k)
        if dp is not None:  # the same mechanism, accounted the same
            reference = SiteAccountant()
            build_task(replace_task(config, precision="fp32")).train(data, steps=2, seed=3, dp=dp,
                                                                      accountant=reference)
            assert accountant.steps == reference.steps == 2
            assert accountant.epsilon() == pytest.approx(reference.epsilon())
        seen.clear()
        task.evaluate(data)  # evaluation stays float32
        assert seen and set(seen) == {torch.float32}


def test_precision_is_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="task.precision = 'fp16'; choose one of fp32, bf16"):
        StudyConfig().replace(task={"precision": "fp16"})
    assert StudyConfig().replace(task={"precision": "bf16"}).task.precision == "bf16"
    assert StudyConfig().task.precision == "fp32"


def test_a_site_sets_its_own_precision(tiny_sites: list[Path], tmp_path: Path) -> None:
    """A hospital chooses the number format its hardware computes fast (site.toml or the
    SuperNode's node config ``precision``), whatever the study's ``task.precision``; a value
    it cannot run is refused at load, naming the key."""
    from flwr.common.config import parse_config_args

    from client.daemon import node_config
    from client.site import site_from_context, site_task
    from medgan_core.config import SiteConfig, load_site

    study_task = task_config(name="denoise", precision="bf16")
    site = SiteConfig(str(tiny_sites[0]), state_dir=str(tmp_path / "state"), precision="fp32")
    assert " precision=" not in node_config(SiteConfig(str(tiny_sites[0])))
    parsed = parse_config_args([node_config(site)])  # as the SuperNode reads its --node-config
    deployed = site_from_context(parsed, {})
    assert deployed.precision == "fp32"
    assert site_task(study_task, deployed).precision == "fp32"
    assert site_task(study_task, SiteConfig(str(tiny_sites[0]))).precision == "bf16"  # unset: the study's
    both = site_task(task_config(name="denoise"), SiteConfig(str(tiny_sites[0]), physical_batch=4, precision="bf16"))
    assert (both.physical_batch, both.precision) == (4, "bf16")
    toml = tmp_path / "site.toml"
    connection = '[connection]\nsuperlink = "127.0.0.1:8000"\nca-cert = "ca.crt"\nprivate-key = "key"\n'
    toml.write_text(f'[site]\ndata-path = "{tiny_sites[0]}"\nprecision = "bf16"\n{connection}')
    assert load_site(toml)[0].precision == "bf16"
    toml.write_text(f'[site]\ndata-path = "{tiny_sites[0]}"\nprecision = "half"\n{connection}')
    with pytest.raises(ConfigError, match="site precision = 'half'; choose one of fp32, bf16"):
        load_site(toml)
    with pytest.raises(ConfigError, match="site precision = 'fp16'"):
        site_from_context({**parsed, "precision": "fp16"}, {})


@pytest.mark.parametrize("site_precision,expected", [("", torch.bfloat16), ("fp32", torch.float32)])
def test_a_deployed_site_trains_the_round_in_the_precision_it_is_given(
        tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        site_precision: str, expected: torch.dtype) -> None:
    """The study's ``task.precision`` travels in the round's config to the ClientApp, which
    trains in it, unless the hospital's node config sets its own ``precision``."""
    from flwr.app import Context, MessageType, RecordDict

    import client.app
    from client.app import build_client_app
    from client_messages import client_request, round_config

    study = tiny_study.replace(task={"name": "denoise", "batch_size": 8, "precision": "bf16"},
                               privacy={"enabled": False})
    seen: list[torch.dtype] = []

    def build_and_watch(config, device):  # type: ignore[no-untyped-def]
        task = build_task(config, device)
        for module in task.groups.values():
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    # training passes only (the round's evaluation runs the networks in eval mode, in float32)
                    layer.register_forward_hook(lambda m, _i, out: seen.append(out.dtype) if m.training else None)
        return task

    monkeypatch.setattr(client.app, "build_task", build_and_watch)
    node = {"data-path": str(tiny_sites[0]), "state-dir": str(tmp_path / "state"), "require-dp": "false",
            "require-secure-rng": "false", "release-test-metrics": "true",
            **({"precision": site_precision} if site_precision else {})}
    request = client_request(MessageType.TRAIN, round_config(study, "bf16"), build_task(study.task).get_weights())
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = build_client_app()(request, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert seen and set(seen) == {expected}

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medgan_core.models import DCGANDiscriminator, DCGANGenerator


@pytest.mark.parametrize("size, skips", [(16, False), (32, False), (64, False), (16, True), (128, True)])
def test_dcgan_shapes(size: int, skips: bool) -> None:
    generator, discriminator = DCGANGenerator(8, size, 8, skips=skips), DCGANDiscriminator(size, 8, skips=skips)
    images = generator(torch.randn(3, 8))
    assert images.shape == (3, 1, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images).shape == (3,)


def test_dcgan_is_opacus_compatible() -> None:
    for model in (DCGANGenerator(8, 32, 8), DCGANDiscriminator(32, 8), DCGANGenerator(8, 32, 8, skips=True),
                  DCGANDiscriminator(32, 8, skips=True)):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert ModuleValidator.validate(model, strict=False) == []


def test_the_skip_networks_reach_every_resolution_directly() -> None:
    """The multi-scale form: every coarse generator layer has its own 1×1 image (8×8 up to
    half the size) in the output, and the discriminator reads the pooled image at every
    block; without skips the parameter names are those of the plain DCGAN (older models load)."""
    torch.manual_seed(0)
    generator, discriminator = DCGANGenerator(8, 64, 8, skips=True), DCGANDiscriminator(64, 8, skips=True)
    assert [m.in_channels for m in generator.to_image] == [32, 16, 8]  # 8×8, 16×16, 32×32
    assert [m.out_channels for m in discriminator.from_image] == [8, 16, 32]  # 32×32, 16×16, 8×8
    discriminator(generator(torch.randn(2, 8))).sum().backward()
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in (*generator.to_image, *discriminator.from_image))
    plain = DCGANGenerator(8, 64, 8).state_dict()
    assert set(plain) < set(generator.state_dict()) and not any("to_image" in k for k in plain)
    with torch.no_grad():  # the 8×8 image alone moves the output: the coarse layers speak to it directly
        z = torch.randn(2, 8)
        before = generator(z)
        generator.to_image[0].bias += 0.5
        assert float((generator(z) - before).abs().mean()) > 0.1

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medgan_core.models import DCGANDiscriminator, DCGANGenerator


@pytest.mark.parametrize("size", [16, 32, 64])
def test_dcgan_shapes(size: int) -> None:
    generator, discriminator = DCGANGenerator(8, size, 8), DCGANDiscriminator(size, 8)
    images = generator(torch.randn(3, 8))
    assert images.shape == (3, 1, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images).shape == (3,)


def test_dcgan_is_opacus_compatible() -> None:
    for model in (DCGANGenerator(8, 32, 8), DCGANDiscriminator(32, 8)):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert ModuleValidator.validate(model, strict=False) == []

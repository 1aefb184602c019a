"""Generators and discriminators (Opacus-compatible) and named-weight helpers."""

from medgan_core.models.dcgan import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights
from medgan_core.models.weights import expected_shapes, group_arrays, load_group_arrays

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "expected_shapes",
    "group_arrays",
    "init_dcgan_weights",
    "load_group_arrays",
]

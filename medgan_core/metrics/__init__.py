"""Image-quality and distribution metrics computed at the site, returned as scalars."""

from medgan_core.metrics.distribution import intensity_distance, sliced_wasserstein

__all__ = ["intensity_distance", "sliced_wasserstein"]

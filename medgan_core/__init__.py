"""MedGAN-FL core: data, models, tasks, privacy and metrics. Imports no Flower code."""

__version__ = "0.1.0"

"""Errors a site admin or researcher can act on.

Every error raised for bad input (files, configs, weights) is a ``MedGANError``; the CLI
prints its message without a traceback.
"""


class MedGANError(Exception):
    """Base class: the message says what is wrong and, where possible, what to do."""


class DataError(MedGANError):
    """A data file, series or manifest is missing, corrupt or inconsistent."""


class ConfigError(MedGANError):
    """A configuration key has a wrong type, value or name."""


class WeightsError(MedGANError):
    """Model weights do not match the expected names, shapes or are not finite."""


class PrivacyError(MedGANError):
    """A model or setting cannot be trained with differential privacy."""


class PrivacyBudgetExhausted(PrivacyError):
    """Training one more round would spend more than the site's privacy budget."""


class SitePolicyError(MedGANError):
    """A study asks a site for more than its own policy allows (besides privacy: compute)."""

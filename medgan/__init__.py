"""The ``medgan`` command and what assembles both sides on one machine (simulation)."""

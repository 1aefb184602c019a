"""Imaging GAN tasks behind one interface (``base.Task``), found by name (``registry``).

Deliberately empty: importing a task module must not import the registry, which imports
every task (no import circle through this package)."""

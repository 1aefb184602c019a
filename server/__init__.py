"""Coordinator side: ServerApp, study loop, checkpoints, samples, reports, CLI."""

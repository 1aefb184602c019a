"""Random flips and quarter turns of paired batches, the same transform for input and target.

A site's training split is small (about a hundred slices), and a local denoiser trained
for many steps on it starts to fit the noise of those slices. Noise and texture have no
preferred orientation, so the eight flips/rotations of each pair are equally valid
training pairs. Each record is transformed on its own, so under DP-SGD it is still one
record with one clipped gradient.
"""

from __future__ import annotations

from typing import Callable

import torch


def dihedral_pairs(*batches: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Each record of the (n, C, H, H) batches turned by the same random one of the 8
    symmetries of the square; every batch gets the same transform per record."""
    n = batches[0].shape[0]
    if any(b.shape[0] != n or b.shape[-1] != b.shape[-2] for b in batches):
        raise ValueError("dihedral_pairs needs square batches of one length")
    turns = torch.randint(0, 4, (n,), generator=generator).tolist()
    flips = torch.randint(0, 2, (n,), generator=generator).tolist()

    def transform(x: torch.Tensor, turn: int, flip: int) -> torch.Tensor:
        x = x.flip(-1) if flip else x
        return torch.rot90(x, turn, dims=(-2, -1))

    return tuple(
        torch.stack([transform(record, turn, flip) for record, turn, flip in zip(batch, turns, flips)])
        for batch in batches
    )


def dihedral_average(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the 8 flips/quarter turns of ``images``, each output turned back and
    the 8 averaged ("self-ensemble"): for a model trained on turned pairs, an average of
    8 estimates whose errors are partly independent. 8× the inference cost."""
    total: torch.Tensor | None = None
    for flip in (False, True):
        flipped = images.flip(-1) if flip else images
        for turn in range(4):
            out = torch.rot90(fn(torch.rot90(flipped, turn, dims=(-2, -1))), -turn, dims=(-2, -1))
            out = out.flip(-1) if flip else out
            total = out if total is None else total + out
    assert total is not None
    return total / 8

"""Image-to-image networks: a small residual U-Net generator and a conditional PatchGAN.

Fully convolutional (any input size divisible by 4 works, e.g. 512×512 clinical CT),
GroupNorm only, upsampling by nearest-neighbour + convolution rather than transposed
convolutions, no in-place ops: all Opacus-compatible.
"""

from __future__ import annotations

import torch
from torch import nn

from medgan_core.models.calibration import SiteCalibration
from medgan_core.models.intensity_map import IntensityMap


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(min(8, c_out), c_out), nn.LeakyReLU(0.2)
    )


class ResidualUNet(nn.Module):
    """x -> x + r(x): learns the correction (noise, artefact) rather than the whole image.

    With more ``in_channels`` than ``channels`` (extra inputs such as a sampling mask),
    the residual is added to the first ``channels`` input channels. ``residual=False``: the
    output is the network's own (another modality's values, where the input's are no
    starting point)."""

    def __init__(self, width: int = 16, channels: int = 1, in_channels: int | None = None, residual: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.residual = residual
        self.enc1 = _block(in_channels or channels, width)
        self.enc2 = _block(width, 2 * width, stride=2)
        self.enc3 = _block(2 * width, 4 * width, stride=2)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(4 * width, 2 * width))
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(2 * width, width))
        self.dec1 = _block(2 * width, width)
        self.out = nn.Conv2d(width, channels, 1)
        if residual:
            nn.init.zeros_(self.out.weight)  # start as the identity: output = input
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        out = self.out(d1)
        return x[:, : self.channels] + out if self.residual else out


class PatchDiscriminator(nn.Module):
    """(input, candidate) -> one real/fake logit per sample (mean over 70×70-style patches);
    with ``channels = 1``, an unconditional judge of one image (CycleGAN)."""

    def __init__(self, width: int = 16, channels: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            nn.GroupNorm(min(8, 2 * width), 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        """The images (e.g. condition, candidate) are stacked as channels."""
        return self.net(torch.cat(images, dim=1)).mean(dim=(1, 2, 3))


def data_consistency(image: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """A complex image (n, H, W) whose acquired k-space lines are exactly the measured ones.

    ``image`` (n, 2, H, W) is the network's estimate (real, imaginary) and ``measured`` the
    network input: the zero-filled image's real and imaginary parts and the sampling mask,
    in the scaling of ``medgan_core.data.kspace`` (real: 2u - 1, imaginary: 2u). What the
    scanner measured is kept; the network only fills in the lines it did not acquire.

    The mask selects phase-encoding columns and every row is fully sampled, so the 2D
    projection is a 1D FFT along each row: identical on a whole slice, and exact on a strip
    of whole rows, which is what the task trains on (``ReconTask.training_pair``).
    """
    estimate = torch.fft.fft(torch.complex((image[:, 0] + 1) / 2, image[:, 1] / 2), dim=-1, norm="forward")
    acquired = torch.fft.fft(torch.complex((measured[:, 0] + 1) / 2, measured[:, 1] / 2), dim=-1, norm="forward")
    mask = measured[:, 2]
    return torch.fft.ifft(mask * acquired + (1 - mask) * estimate, dim=-1, norm="forward")


def magnitude(image: torch.Tensor) -> torch.Tensor:
    """|complex image| (n, H, W) -> (n, 1, H, W) in the [-1, 1] scaling (smooth at 0)."""
    return 2 * torch.sqrt(image.real**2 + image.imag**2 + 1e-12)[:, None] - 1


class DataConsistentUNet(nn.Module):
    """Compressed-sensing MR reconstruction: a residual U-Net on the zero-filled image
    (real, imaginary, mask channels) estimating the complex image, a data-consistency
    layer, and the magnitude image radiologists read; with ``cascades`` > 1, that many
    (U-Net, data consistency) stages in a row, each refining the last one's image (an
    unrolled reconstruction: every data-consistency step mixes a whole row's k-space,
    which one U-Net's small field of view cannot). It starts as the identity, so an
    untrained model returns the zero-filled reconstruction. With ``tv_start`` the input's
    fourth channel (a TV compressed-sensing reconstruction, ``task.tv-start``) is where the
    first stage starts instead, so an untrained model returns that reconstruction with the
    measured lines put back, and training learns what TV misses."""

    def __init__(self, width: int = 16, cascades: int = 1, tv_start: bool = False) -> None:
        super().__init__()
        self.tv_start = tv_start
        self.unet = ResidualUNet(width, channels=2, in_channels=3)
        self.more = nn.ModuleList(ResidualUNet(width, channels=2, in_channels=3) for _ in range(cascades - 1))

    def complex_image(self, measured: torch.Tensor) -> torch.Tensor:
        first = measured[:, :3]
        if self.tv_start:  # the TV image as a real estimate (imaginary part 0), beside the mask
            if measured.shape[1] < 4:
                raise ValueError(f"this recon model starts from a TV reconstruction (task.tv-start) and got "
                                 f"{measured.shape[1]} input channels without it; prepare inputs with "
                                 "reconstruction_input(..., tv_weight)")
            first = torch.cat([measured[:, 3:4], torch.zeros_like(measured[:, 3:4]), measured[:, 2:3]], dim=1)
        image = data_consistency(self.unet(first), measured)
        for stage in self.more:
            current = torch.stack([2 * image.real - 1, 2 * image.imag, measured[:, 2]], dim=1)
            image = data_consistency(stage(current), measured)
        return image

    def forward(self, measured: torch.Tensor) -> torch.Tensor:
        return magnitude(self.complex_image(measured))


class CycleGenerators(nn.Module):
    """CycleGAN's two generators as one parameter group: ``ab`` maps domain A (the
    reference scanner) to B, ``ba`` B to A, each followed by a site calibration (the
    identity unless trained). Called plainly it harmonises: B -> A. With ``histogram_start``
    each generator reads its input through the site's histogram matching (``match``: B to A,
    its inverse A to B), so an untrained model is that matching and training learns the
    rest."""

    def __init__(self, width: int = 16, histogram_start: bool = False) -> None:
        super().__init__()
        self.ab = ResidualUNet(width)
        self.ba = ResidualUNet(width)
        # Each direction's output in its target scanner's calibration (see SiteCalibration).
        self.calibrate_ab = SiteCalibration()
        self.calibrate_ba = SiteCalibration()
        self.match = IntensityMap() if histogram_start else None

    def forward(self, images: torch.Tensor, direction: str = "ba") -> torch.Tensor:
        if direction == "ab":
            if self.match is not None:
                images = self.match(images, inverse=True)
            return self.calibrate_ab(self.ab(images))
        if self.match is not None:
            images = self.match(images)
        return self.calibrate_ba(self.ba(images))


class CycleDiscriminators(nn.Module):
    """CycleGAN's two PatchGANs as one parameter group: ``a`` judges domain A, ``b`` B, each
    image as ``channels`` views of it."""

    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.a = PatchDiscriminator(width, channels=channels)
        self.b = PatchDiscriminator(width, channels=channels)

    def forward(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        return (self.a if domain == "a" else self.b)(images)

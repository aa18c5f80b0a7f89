"""The picks pictures (autopick's picks.png) show the micrograph low-passed, as RELION's manual-picking display
(issue 14: picks were drawn on unfiltered micrographs, where particles at low SNR are invisible)."""

from __future__ import annotations

import numpy as np
import torch

from cryopipe.picking.common import thumbnail


def _high_fraction(img: np.ndarray, cutoff: float) -> float:
    """Fraction of the (mean-removed) power beyond ``cutoff`` cycles per pixel."""
    ft = np.fft.rfft2(img - img.mean())
    ky = np.fft.fftfreq(img.shape[0])[:, None]
    kx = np.fft.rfftfreq(img.shape[1])[None, :]
    p = np.abs(ft) ** 2
    return float(p[np.hypot(ky, kx) > cutoff].sum() / p.sum())


def test_thumbnail_is_lowpassed_at_the_display_resolution():
    gen = torch.Generator().manual_seed(0)
    mic = torch.randn(512, 512, generator=gen)  # white noise: equal power at all frequencies
    plain, b = thumbnail(mic, max_side=256)
    filtered, b2 = thumbnail(mic, max_side=256, pixel_size=2.0, lowpass_A=20.0)
    assert b == b2 == 2 and plain.shape == filtered.shape == (256, 256)
    cutoff = 2.0 * b / 20.0  # 0.2 cycles per thumbnail pixel
    assert _high_fraction(plain, cutoff + 0.02) > 0.5  # noise everywhere
    assert _high_fraction(filtered, cutoff + 0.02) < 1e-6  # nothing beyond 20 Å
    # the low frequencies are kept: the filtered thumbnail is the plain one's low-pass
    assert np.corrcoef(filtered.ravel(), plain.ravel())[0, 1] > 0.3


def test_no_filter_when_the_binned_nyquist_is_already_coarser():
    mic = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    plain, _ = thumbnail(mic, max_side=256)
    same, _ = thumbnail(mic, max_side=256, pixel_size=12.0, lowpass_A=20.0)  # Nyquist 24 Å > 20 Å
    assert np.array_equal(plain, same)

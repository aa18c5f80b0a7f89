"""2D class averages as the reference model of the engine: predictions for every (class, ψ) and the
back-rotation of the M-step sums into the class frames.

Geometry (as RELION's 2D classification and :func:`cryopipe.core.geometry.rotation_2d`): a class average ``R`` seen
at in-plane angle ψ has FT ``R̂(Aᵀ·k)`` with ``A = [[cos ψ, sin ψ], [−sin ψ, cos ψ]]``; conversely the
observation-frame coefficient at ``A·q`` belongs to class-frame frequency ``q``.

Interpolation in Fourier space is bilinear on a zero-padded grid (``pad = 2``, RELION's default), with the
matching gridding correction: the class image is divided by ``sinc²(x/(pad·n))·sinc²(y/(pad·n))`` before padding
(predictions), and the reconstructed image after the back-rotation (sums). Two back-rotations of the sums ``S``
(``Σ w·C·X``) and ``W`` (``Σ w·C²``) of each (class, ψ):

* :func:`back_project_sums` (the EM M-step): RELION's ``backrotate2D``, each observation coefficient spread with
  bilinear fractions onto the :class:`PaddedGrid` at ``pad·Aᵀ·v``; the division and the crop to the box follow
  on that grid. Class averages and their SSNR match RELION's (issue 11). Cost ``4·K·R·P`` scatter-adds.
* :func:`back_rotate_sums` (gradient rules, whose momenta live on the box's own coefficients): the sums taken to
  real space, zero-padded, transformed and sampled at ``pad·A·q`` for every box coefficient ``q``; ``W`` sampled
  on the unpadded grid. Cost ``K·R`` small FFTs.

Both are independent of the number of particles.

Scale: predictions and sums are ``FT / n²`` (RELION's normalisation), class images are in the particles' units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryopipe.core.fourier import good_fft_size, irfft2_centered, rfft2_centered
from cryopipe.engine.coefficients import CoefficientSet

__all__ = ["ClassReferences2D", "gridding_correction_2d", "rotate_frequencies", "back_rotate_sums",
           "back_project_sums", "images_to_coefficients", "coefficients_to_images", "PaddedGrid"]


def gridding_correction_2d(n: int, padn: int, device=None) -> torch.Tensor:
    """``[n, n]`` separable bilinear-interpolation correction ``sinc²(x/padn)·sinc²(y/padn)`` (x, y pixels from
    the centre ``n//2``)."""
    c = (torch.arange(n, device=device, dtype=torch.float64) - n // 2) / padn
    s = torch.sinc(c) ** 2
    return (s[:, None] * s[None, :]).to(torch.float32)


def rotate_frequencies(k: torch.Tensor, psi_deg: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``[R, P, 2]``: frequencies ``k [P, 2]`` rotated by ``A(ψ)ᵀ`` (``transpose=True``, class frame of an
    observation frequency) or ``A(ψ)`` (observation frame of a class frequency), ψ in degrees ``[R]``."""
    p = torch.deg2rad(psi_deg.to(torch.float64))
    c, s = torch.cos(p)[:, None], torch.sin(p)[:, None]
    kx, ky = k[:, 0].to(torch.float64)[None, :], k[:, 1].to(torch.float64)[None, :]
    if transpose:  # Aᵀ k = (c kx − s ky, s kx + c ky)
        x, y = c * kx - s * ky, s * kx + c * ky
    else:  # A k = (c kx + s ky, −s kx + c ky)
        x, y = c * kx + s * ky, -s * kx + c * ky
    return torch.stack([x, y], dim=-1).to(torch.float32)


def _centred_full_ft(img: torch.Tensor) -> torch.Tensor:
    """Full centred 2D FT ``[..., m, m]`` (zero frequency at index ``m//2``) of centred images ``[..., m, m]``."""
    ft = torch.fft.fft2(torch.fft.ifftshift(img, dim=(-2, -1)))
    return torch.fft.fftshift(ft, dim=(-2, -1))


def _sample_grid(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of centred grids ``grid [C, ch, m, m]`` (real, ``ch`` channels, frequency 0 at
    ``m//2``) at ``points [C, Q, 2]`` = (fx, fy) in grid pixels → ``[C, ch, Q]``; zero outside the grid."""
    C, ch, m, _ = grid.shape
    idx = points + float(m // 2)
    norm = idx * (2.0 / (m - 1)) - 1.0
    out = F.grid_sample(grid, norm[:, None, :, :], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, :, 0, :]


def images_to_coefficients(images: torch.Tensor, cset: CoefficientSet) -> torch.Tensor:
    """Real images ``[..., n, n]`` → coefficient vectors ``[..., P]`` (``FT / n²``)."""
    n = images.shape[-1]
    return cset.gather(rfft2_centered(images)) / float(n * n)


def coefficients_to_images(coeffs: torch.Tensor, cset: CoefficientSet) -> torch.Tensor:
    """Coefficient vectors ``[..., P]`` (``FT / n²``) → real images ``[..., n, n]`` (zero beyond the set)."""
    n = cset.n
    return irfft2_centered(cset.scatter(coeffs) * float(n * n), n)


@dataclass(frozen=True)
class PaddedGrid:
    """RELION's 2D reconstruction grid (``BackProjector`` for box ``n``, current radius ``r_max``, padding
    ``pad``): the stored half (``kx >= 0``) of the ``pad·n`` transform with ``|p|² < (pad·r_max)²``, **both** halves
    of the ``kx = 0`` column kept as separate entries (RELION stores and fills them separately). ``Q`` points:

    * ``flat [Q]``: index into the flattened ``[pad·n, pad·n//2+1]`` half grid (FFT order along ``ky``);
    * ``p [Q, 2]``: (kx, ky) in padded-grid pixels (``p / pad`` in units of the box);
    * ``shell [Q]``: ``ROUND(|p|/pad)`` (RELION's ``ires`` of the SSNR arrays and the MAP term);
    * ``shell_floor [Q]``: ``FLOOR(|p|/pad)`` (the ``ires`` of RELION's ``--skip_gridding`` weight floor).

    Values on the grid are kept at the scale of the box's own coefficients (``FT / n²``); weights are sums of
    bilinear fractions, so a point holds about ``1/pad²`` of a box coefficient's weight (RELION's
    ``oversampling_correction``, :attr:`oversampling`).

    RELION divides its sums by its weights on this grid and crops the ``pad·n`` reconstruction to the box in real
    space, which drops what the division puts outside the box (on the box's own grid it would fold back in: more
    noise near the edges and in the outer shells of the class averages, issue 11)."""

    flat: torch.Tensor
    p: torch.Tensor
    shell: torch.Tensor
    shell_floor: torch.Tensor
    n: int
    pad: int
    r_max: int

    @classmethod
    def make(cls, n: int, r_max: int, pad: int, device=None) -> "PaddedGrid":
        padn, half = pad * n, pad * n // 2 + 1
        ky = torch.fft.fftfreq(padn, 1.0 / padn, device=device).round().long()
        kx = torch.arange(half, device=device)
        py, px = torch.meshgrid(ky, kx, indexing="ij")
        r2 = (px * px + py * py).reshape(-1)
        flat = torch.nonzero(r2 < (pad * int(r_max)) ** 2).reshape(-1)
        radius = torch.sqrt(r2[flat].to(torch.float64)) / pad
        p = torch.stack([px.reshape(-1)[flat], py.reshape(-1)[flat]], dim=-1).to(torch.float32)
        return cls(flat, p, torch.floor(radius + 0.5).long(), torch.floor(radius).long(), int(n), int(pad),
                   int(r_max))

    @property
    def oversampling(self) -> float:
        """RELION's ``oversampling_correction`` of a 2D grid: ``pad²``."""
        return float(self.pad * self.pad)

    def to_half_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``[..., Q]`` → ``[..., pad·n, pad·n//2+1]`` (zero elsewhere)."""
        padn = self.pad * self.n
        out = values.new_zeros(*values.shape[:-1], padn * (padn // 2 + 1))
        out[..., self.flat] = values
        return out.reshape(*values.shape[:-1], padn, padn // 2 + 1)

    def to_images(self, values: torch.Tensor) -> torch.Tensor:
        """``[..., Q]`` values (box-``n`` scale) → the ``pad·n`` image cropped to the central ``[..., n, n]``. The
        two halves of the ``kx = 0`` column are made each other's conjugates by averaging (what a complex-to-real
        transform of RELION's grid keeps)."""
        n, padn = self.n, self.pad * self.n
        ft = self.to_half_grid(values.to(torch.complex64))
        col = ft[..., 0]
        mate = col[..., (-torch.arange(padn, device=col.device)) % padn].conj()
        ft[..., 0] = 0.5 * (col + mate)
        big = irfft2_centered(ft * float(n * n), padn)
        s = padn // 2 - n // 2
        return big[..., s:s + n, s:s + n]


class ClassReferences2D:
    """Predictions of ``K`` class averages for all in-plane angles (a :class:`~cryopipe.engine.estep.
    PredictionSource`).

    Args:
        images: ``[K, n, n]`` class averages (real space).
        cset: the coefficient set of the iteration (``P`` coefficients); ``coarse_size`` leading ones are used
            by the coarse pass.
        coarse_psi: ``[Rc]`` coarse angles (degrees); ``fine_psi``: ``[Rc, S]`` their children (``None``: no
            second pass).
        pad: padding factor of the Fourier grid.

    ``coarse()`` → ``[K, Rc, Pc]``; ``fine(k_idx, r_idx)`` → ``[M, S, P]`` (all computed once, at construction).
    """

    def __init__(self, images: torch.Tensor, cset: CoefficientSet, coarse_size: int, coarse_psi: torch.Tensor,
                 fine_psi: torch.Tensor | None = None, pad: int = 2):
        K, n, _ = images.shape
        dev = images.device
        self.n = n
        self.cset = cset
        self.pad = int(pad)
        self.padn = self.pad * n
        self.n_classes = K
        self.coarse_psi = coarse_psi.to(dev)
        self.fine_psi = None if fine_psi is None else fine_psi.to(dev)
        self.n_coarse = int(coarse_psi.numel())
        self.n_children = 1 if fine_psi is None else int(fine_psi.shape[1])
        self._grid = self._padded_grid(images)
        k = cset.k.to(dev)
        self._coarse = self.predict(torch.arange(K, device=dev), self.coarse_psi, k[:coarse_size])
        if fine_psi is None:
            self._fine = self.predict(torch.arange(K, device=dev), self.coarse_psi, k)[:, :, None, :]
        else:
            f = self.predict(torch.arange(K, device=dev), self.fine_psi.reshape(-1), k)
            self._fine = f.reshape(K, self.n_coarse, self.n_children, -1)

    def _padded_grid(self, images: torch.Tensor) -> torch.Tensor:
        n, padn = self.n, self.padn
        corr = gridding_correction_2d(n, padn, images.device)
        img = images.to(torch.float32) / corr
        big = torch.zeros(images.shape[0], padn, padn, device=images.device, dtype=torch.float32)
        s = padn // 2 - n // 2
        big[:, s:s + n, s:s + n] = img
        ft = _centred_full_ft(big) / float(n * n)
        return torch.stack([ft.real, ft.imag], dim=1).contiguous()  # [K, 2, padn, padn]

    def predict(self, class_idx: torch.Tensor, psi_deg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``[len(class_idx), R, Q]`` predictions of classes ``class_idx`` at angles ``psi_deg [R]`` for
        frequencies ``k [Q, 2]``."""
        R, Q = psi_deg.numel(), k.shape[0]
        pts = rotate_frequencies(k, psi_deg, transpose=True).reshape(1, R * Q, 2) * self.pad
        g = self._grid[class_idx]
        out = _sample_grid(g, pts.expand(g.shape[0], R * Q, 2))
        return torch.complex(out[:, 0], out[:, 1]).reshape(g.shape[0], R, Q)

    def tau2(self, r_max: int) -> torch.Tensor:
        """``[K, n//2+1]`` float64 reference spectra ``τ²`` as RELION computes them for the E-step
        (``Projector::computeFourierTransformMap``): mean ``|F/n²|²/2`` over the points of the padded
        (gridding-corrected) transform with ``|p| <= round(pad·r_max)``, in shell ``round(|p|/pad)``; zero beyond.

        The padded grid also samples the transform between the integer frequencies, where a reference that is
        (nearly) zero beyond its resolution still has the small power of its finite support; RELION's τ² (and so
        its regularisation and its resolution estimate beyond the current resolution) includes it."""
        n, pad, padn = self.n, self.pad, self.padn
        ns = n // 2 + 1
        g = self._grid
        dev = g.device
        c = padn // 2
        ky = torch.arange(padn, device=dev, dtype=torch.float64) - c
        kx = torch.arange(padn - c, device=dev, dtype=torch.float64)
        r2 = ky[:, None] ** 2 + kx[None, :] ** 2
        R = int(round(pad * min(int(r_max), n // 2)))
        ires = torch.floor(torch.sqrt(r2) / pad + 0.5).long()
        keep = (r2 <= R * R) & (ires < ns)
        half = g[:, :, :, c:].to(torch.float64)
        pw = ((half[:, 0] ** 2 + half[:, 1] ** 2) / 2.0)[:, keep]  # [K, M]
        idx = ires[keep]
        sums = torch.zeros(g.shape[0], ns, dtype=torch.float64, device=dev).index_add_(1, idx, pw)
        cnt = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(0, idx, torch.ones_like(pw[0]))
        return torch.where(cnt[None] > 0, sums / cnt.clamp_min(1)[None], torch.zeros_like(sums))

    def coarse(self) -> torch.Tensor:
        return self._coarse

    def fine(self, k_idx: torch.Tensor, r_idx: torch.Tensor) -> torch.Tensor:
        return self._fine[k_idx, r_idx]

    def final_psi(self) -> torch.Tensor:
        """``[Rf]`` angles of the final grid (fine if two passes, else coarse): index ``r·S + j``."""
        return self.coarse_psi if self.fine_psi is None else self.fine_psi.reshape(-1)


def back_rotate_sums(S: torch.Tensor, W: torch.Tensor, psi_deg: torch.Tensor, cset: CoefficientSet,
                     pad: int = 2, chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate per-(class, ψ) sums into the class frames and add them over ψ.

    Args:
        S: ``[K, R, P]`` complex ``Σ w·C·X`` per class and angle (observation frame, coefficient vectors).
        W: ``[K, R, P]`` real ``Σ w·C²``.
        psi_deg: ``[R]`` angles of the sums (degrees).
        cset: coefficient set of ``S``/``W`` (and of the output, in the class frame).

    Returns:
        ``data [K, P]`` complex and ``weight [K, P]`` real in the class frames; the data carry the real-space
        attenuation ``sinc²(x/(pad·n))·sinc²(y/(pad·n))`` of the bilinear interpolation (undo it on the final
        image with :func:`gridding_correction_2d`).
    """
    K, R, P = S.shape
    dev = S.device
    # work in the smallest (FFT-friendly, even) box that holds the set: Fourier-cropped images cover the same
    # physical box, so the sampled values and the real-space attenuation sinc²(x/(pad·n)) are those of box n
    n = min(cset.n, good_fft_size(2 * int(cset.r_max) + 4))
    cset = cset.in_box(n) if n != cset.n else cset
    padn = pad * n
    q = cset.k.to(dev)
    obs = rotate_frequencies(q, psi_deg.to(dev), transpose=False)  # [R, P, 2]: observation frame of q
    data = torch.zeros(K, P, dtype=torch.complex64, device=dev)
    weight = torch.zeros(K, P, dtype=torch.float32, device=dev)
    per_item = 8 * padn * padn + 8 * n * n
    step = max(1, int(chunk_bytes // per_item))
    kk, rr = torch.meshgrid(torch.arange(K, device=dev), torch.arange(R, device=dev), indexing="ij")
    kk, rr = kk.reshape(-1), rr.reshape(-1)
    s = padn // 2 - n // 2
    for c0 in range(0, K * R, step):
        ki, ri = kk[c0:c0 + step], rr[c0:c0 + step]
        C = ki.numel()
        # data: real-space image of each sum, zero-padded, full centred FT, bilinear at pad·A·q
        img = coefficients_to_images(S[ki, ri], cset) / float(n * n)  # irfft(FT/n² · n²)/n² = FT⁻¹ scale kept
        big = torch.zeros(C, padn, padn, device=dev, dtype=torch.float32)
        big[:, s:s + n, s:s + n] = img
        ft = _centred_full_ft(big)
        g = torch.stack([ft.real, ft.imag], dim=1)
        vals = _sample_grid(g, obs[ri] * pad)  # [C, 2, P]
        data.index_add_(0, ki, torch.complex(vals[:, 0], vals[:, 1]))
        # weight: full centred grid of the (Hermitian-symmetric) CTF² sums, bilinear at A·q
        half = cset.scatter(W[ki, ri])  # [C, n, n//2+1]
        full = _full_from_half_real(half, n)
        wv = _sample_grid(full[:, None], obs[ri])[:, 0]
        weight.index_add_(0, ki, wv)
    return data, weight


def back_project_sums(S: torch.Tensor, W: torch.Tensor, psi_deg: torch.Tensor, cset: CoefficientSet,
                      grid: PaddedGrid, chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's 2D back-projection (``BackProjector::backrotate2D``, bilinear): every observation coefficient
    ``v`` with ``|v| <= r_max`` of every (class, ψ) sum goes to padded-grid position ``pad·Aᵀ·v`` (class frame;
    ``kx < 0`` → its Hermitian mate ``−p`` with the conjugate value) and is spread over the 4 neighbouring grid
    points with bilinear fractions; data and weight alike.

    Args:
        S: ``[K, R, P]`` complex ``Σ w·C·X`` per class and angle (observation frame, coefficient vectors).
        W: ``[K, R, P]`` real ``Σ w·C²``.
        psi_deg: ``[R]`` angles of the sums (degrees).
        cset: coefficient set of ``S``/``W``.
        grid: the reconstruction grid (its ``r_max`` bounds the coefficients used).

    Returns:
        ``data [K, Q]`` complex128 and ``weight [K, Q]`` float64 on ``grid`` (the data carry the real-space
        attenuation ``sinc²(x/(pad·n))·sinc²(y/(pad·n))`` of the interpolation: undo it on the final image with
        :func:`gridding_correction_2d`).
    """
    K, R, P = S.shape
    dev = S.device
    pad, padn = grid.pad, grid.pad * grid.n
    rows, cols, off = padn + 4, padn // 2 + 2, padn // 2 + 2  # room for every corner, no wrap-around
    keep = cset.radius.to(dev) <= grid.r_max
    k = cset.k.to(dev)[keep]
    data = torch.zeros(K, rows * cols, dtype=torch.complex128, device=dev)
    weight = torch.zeros(K, rows * cols, dtype=torch.float64, device=dev)
    step = max(1, int(chunk_elems) // max(1, K * int(keep.sum())))
    for r0 in range(0, R, step):
        q = rotate_frequencies(k, psi_deg[r0:r0 + step].to(dev), transpose=True).to(torch.float64) * pad
        s_val = S[:, r0:r0 + step][:, :, keep].to(torch.complex128)
        w_val = W[:, r0:r0 + step][:, :, keep].to(torch.float64)
        neg = q[..., 0] < 0  # [Rc, P]: only the kx >= 0 half is stored
        q = torch.where(neg[..., None], -q, q)
        s_val = torch.where(neg[None], s_val.conj(), s_val)
        base = torch.floor(q)
        frac = q - base
        x0, y0 = base[..., 0].long(), base[..., 1].long() + off
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            f = (frac[..., 0] if dx else 1.0 - frac[..., 0]) * (frac[..., 1] if dy else 1.0 - frac[..., 1])
            idx = ((y0 + dy) * cols + (x0 + dx)).reshape(-1)
            data.index_add_(1, idx, (s_val * f[None]).reshape(K, -1))
            weight.index_add_(1, idx, (w_val * f[None]).reshape(K, -1))
    at = ((grid.p[:, 1].long() + off) * cols + grid.p[:, 0].long()).to(dev)
    return data[:, at], weight[:, at]


def _full_from_half_real(half: torch.Tensor, n: int) -> torch.Tensor:
    """Centred full grid ``[..., n, n]`` (frequency 0 at ``n//2``) of a real, Hermitian-symmetric function given
    on the half-complex grid ``[..., n, n//2+1]`` (value at ``−k`` = value at ``k``)."""
    h = n // 2 + 1
    full = torch.zeros(*half.shape[:-1], n, device=half.device, dtype=half.dtype)
    full[..., :h] = half
    # kx < 0: value(ky, kx) = value(−ky, −kx)
    mate_rows = (-torch.arange(n, device=half.device)) % n
    cols = n - h - torch.arange(n - h, device=half.device)  # full column h+i holds kx = −(n−h−i)
    full[..., h:] = half[..., mate_rows, :][..., cols]
    return torch.fft.fftshift(full, dim=(-2, -1))

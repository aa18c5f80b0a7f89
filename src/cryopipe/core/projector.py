"""Fourier-slice projector (RELION ``Projector`` semantics), batched over orientations in torch.

Geometry (docs/design.md): for the RELION matrix ``A = euler_to_matrix(rot, tilt, psi)`` the 2D FT of the
projection is ``P(k) = V̂(Aᵀ·(kx, ky, 0))``; a particle with origin ``o`` (pixels) is predicted as
``shift(P, −o)``.

How the slice is computed (re-derived from RELION's ``Projector::computeFourierTransformMap`` / ``project``):

1. *Gridding pre-correction*: the real-space map is divided by the Fourier transform of the interpolation
   kernel, ``sinc²(r / (pad·N))`` for trilinear and ``sinc(r / (pad·N))`` for nearest-neighbour interpolation
   (``r`` = distance in voxels from the centre voxel ``N//2``; ``sinc(t) = sin(πt)/(πt)``). Linear interpolation
   between Fourier samples spaced ``1/(pad·N)`` is a convolution with a triangle of that width, whose inverse
   FT multiplies the real-space map by ``sinc²``; dividing beforehand cancels the attenuation.
2. The corrected map is zero-padded (centred) to ``pad·N`` (made even) and transformed with
   :func:`rfft3_centered`. The coefficients with ``|j| <= R = round(pad·r_max)`` are kept in a half grid
   ``[2R+3, 2R+3, R+2]`` (``z, y`` centred at index ``R+1``, ``x = 0 … R+1``), zero elsewhere; on the padded
   Nyquist plane only the ``+pad·N/2`` side is filled, as RELION does.
3. Output pixel ``(kx, ky)`` (``|k| <= r_max``, rows ``0 … N//2`` are ``ky >= 0``) samples the half grid at
   ``p = pad·Aᵀ·(kx, ky, 0)``; points with ``p_x < 0`` use the Hermitian mate ``conj(V̂(−p))``.

Scale: with torch's unnormalised forward FFT the padded 3D transform sampled at ``pad·k`` equals the 2D
transform of the projection (line integral along z), so :func:`irfft2_centered` of the result is the real-space
projection with RELION's scale (``relion_project``).
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.fourier import irfft2_centered, rfft3_centered

__all__ = ["Projector", "padded_size", "gridding_correction", "interpolate_half_grid", "slice_coordinates"]

_INTERPOLATIONS = ("trilinear", "nearest")


def padded_size(n: int, pad: float) -> int:
    """RELION's padded box: ``round(pad·n)`` made even."""
    p = int(round(pad * n))
    return p + (p % 2)


def gridding_correction(n: int, padn: int, interpolation: str = "trilinear", ndim: int = 3,
                        device=None, dtype=torch.float64) -> torch.Tensor:
    """Real-space gridding factor ``sinc²(r/padn)`` (trilinear) or ``sinc(r/padn)`` (nearest) on an ``n``-box
    centred at ``n//2`` (``r`` in voxels). Divide a map by it before padding/FFT (projector) or after the
    inverse FFT (back-projector)."""
    c = torch.arange(n, device=device, dtype=torch.float64) - n // 2
    if ndim == 3:
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    else:
        r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    s = torch.sinc(r / padn)  # torch.sinc is the normalised sinc sin(pi x)/(pi x)
    if interpolation == "trilinear":
        s = s * s
    elif interpolation != "nearest":
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    return s.to(dtype)


def slice_coordinates(n: int, r_max: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of an ``n × n`` half-complex image that a projection fills: ``|k| <= r_max`` (Fourier pixels).

    Returns ``(flat_index [M] into the flattened [n, n//2+1] grid, k [M, 2] = (kx, ky) float64)``. Row ``i``
    has ``ky = i`` for ``i <= n//2`` and ``i − n`` otherwise (RELION's convention: the Nyquist row is
    ``+n/2``).
    """
    half = n // 2 + 1
    rows = torch.arange(n, device=device)
    ky = torch.where(rows <= n // 2, rows, rows - n).to(torch.float64)
    kx = torch.arange(half, device=device, dtype=torch.float64)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    inside = (kxx * kxx + kyy * kyy) <= r_max * r_max + 1e-9
    flat = torch.nonzero(inside.reshape(-1), as_tuple=False).reshape(-1)
    k = torch.stack([kxx.reshape(-1)[flat], kyy.reshape(-1)[flat]], dim=-1)
    return flat, k


def _fft_to_centred(ft: torch.Tensor, R: int, padn: int) -> torch.Tensor:
    """Half-complex FFT-ordered grid ``[padn, padn, padn//2+1]`` -> centred half grid ``[2R+3, 2R+3, R+2]``
    (``z, y`` coordinate ``c`` at index ``c + R + 1``). The padded Nyquist planes (``±padn/2``, one FFT index)
    are placed at ``+padn/2`` only, as RELION does; coordinates absent from the FFT grid are zero."""
    h = padn // 2
    # centred along z, y: index i <-> coordinate c = i - h + 1, c in [-h+1, h]
    s = torch.roll(ft, shifts=(h - 1, h - 1), dims=(0, 1))
    size = 2 * R + 3
    out = torch.zeros((size, size, R + 2), dtype=ft.dtype, device=ft.device)
    lo, hi = max(-R - 1, -h + 1), min(R + 1, h)
    xm = min(R + 2, h + 1)
    c0 = R + 1
    out[lo + c0:hi + c0 + 1, lo + c0:hi + c0 + 1, :xm] = s[lo + h - 1:hi + h, lo + h - 1:hi + h, :xm]
    return out


def _centred_to_fft(g: torch.Tensor, R: int, padn: int) -> torch.Tensor:
    """Inverse of :func:`_fft_to_centred`: centred half grid -> FFT-ordered ``[padn, padn, padn//2+1]``
    (coordinates ``-padn/2+1 … +padn/2`` kept, as RELION's ``windowFourierTransform``)."""
    h = padn // 2
    out = torch.zeros((padn, padn, h + 1), dtype=g.dtype, device=g.device)
    lo, hi = max(-R - 1, -h + 1), min(R + 1, h)
    xm = min(R + 2, h + 1)
    c0 = R + 1
    out[lo + h - 1:hi + h, lo + h - 1:hi + h, :xm] = g[lo + c0:hi + c0 + 1, lo + c0:hi + c0 + 1, :xm]
    return torch.roll(out, shifts=(-(h - 1), -(h - 1)), dims=(0, 1))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def interpolate_half_grid(grid: torch.Tensor, centre: int, points: torch.Tensor,
                          interpolation: str = "trilinear") -> torch.Tensor:
    """Sample a centred half grid ``[Z, Y, X]`` (``z, y`` index = coordinate + ``centre``, ``x`` = coordinate
    ``>= 0``) at points ``[..., 3]`` = ``(x, y, z)`` (grid units). Points with ``x < 0`` are read from their
    Hermitian mate ``−p`` and conjugated (complex grids). Trilinear or nearest-neighbour (rounding half away
    from zero, mate chosen after rounding, as RELION). Indices are clamped to the grid: callers keep
    ``|p| <= centre − 1`` so that all 8 neighbours exist.
    """
    x, y, z = points.unbind(-1)
    return _sample_half_grid(grid, centre, x, y, z, interpolation)


# points per piece of the 8-corner gather and interpolation in :func:`_sample_half_grid`. The largest work array
# ([2, 8, piece] real) stays below torch's 32768-element parallel grain, so these many small kernels run inline
# in the calling thread: cache-resident, and no OpenMP region per kernel (on a machine whose cores are shared,
# every region can wait a scheduler time slice for its second thread: 64k-point pieces then ran 4-20x slower
# with 2 threads). Measured on a 2-core AVX-512 CPU, 1 thread: 2k points 6-15% slower than 32k, 2M 2.3x slower.
_SAMPLE_PIECE = 2000
# at most this many coefficients per chunk of Projector.project (also bounded by its chunk_pixels): per-point
# arrays of a few MB, reused from the heap rather than freshly mapped (page faults), still few parallel kernels
_CHUNK_POINTS = 1 << 18


def _sample_half_grid(grid: torch.Tensor, centre: int, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                      interpolation: str) -> torch.Tensor:
    """:func:`interpolate_half_grid` for coordinates given as separate tensors of one shape (planar layout).

    Same arithmetic as the textbook form, organised for speed: per-point index work on all points at once,
    then in pieces of :data:`_SAMPLE_PIECE` points the 8 corners gathered with one ``index_select`` on the
    flat grid (an order of magnitude faster than advanced indexing of complex tensors on CPU) and
    interpolated as separate real/imaginary planes (``a + (b − a)·t`` per component is exactly the complex
    product with a real ``t``)."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    Z, Y, X = grid.shape
    flat = grid.reshape(-1)
    cplx = grid.is_complex()
    shape = x.shape
    x, y, z = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    if interpolation == "nearest":
        xr, yr, zr = _round_half_away(x), _round_half_away(y), _round_half_away(z)
        neg = xr < 0
        s = torch.where(neg, -1.0, 1.0).to(xr.dtype)
        ix = (xr * s).long().clamp(0, X - 1)
        iy = (yr * s).long().add(centre).clamp(0, Y - 1)
        iz = (zr * s).long().add(centre).clamp(0, Z - 1)
        val = flat.index_select(0, (iz * Y + iy) * X + ix)
        return (torch.where(neg, val.conj(), val) if cplx else val).reshape(shape)
    neg = x < 0
    s = torch.where(neg, -1.0, 1.0).to(x.dtype)
    x, y, z = x * s, y * s, z * s
    x0, y0, z0 = torch.floor(x), torch.floor(y), torch.floor(z)
    rdt = grid.real.dtype if cplx else grid.dtype
    fx, fy, fz = (x - x0).to(rdt), (y - y0).to(rdt), (z - z0).to(rdt)
    ix = x0.long().clamp(0, X - 2)
    iy = y0.long().add(centre).clamp(0, Y - 2)
    iz = z0.long().add(centre).clamp(0, Z - 2)
    base = (iz * Y + iy) * X + ix
    sy, sz = X, X * Y
    offs = torch.tensor([0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1], device=base.device)[:, None]
    P = base.numel()
    out = torch.empty(P, dtype=grid.dtype, device=grid.device)
    piece = _SAMPLE_PIECE if grid.device.type == "cpu" else max(P, 1)  # GPUs: few large kernels
    for a in range(0, P, piece):
        q = slice(a, a + piece)
        v = flat.index_select(0, (base[q][None] + offs).reshape(-1)).reshape(8, -1)  # corners (z, y, x)
        v = torch.view_as_real(v).permute(2, 0, 1).contiguous() if cplx else v[None]  # [2 (re, im) | 1, 8, p]
        # lerp(a, b, t) = a + (b − a)·t along x, then y, then z (corner pairs differ in the last index bit)
        c = v[:, 0::2] + (v[:, 1::2] - v[:, 0::2]) * fx[q]  # [., 4, p]: (z, y) = 00, 01, 10, 11
        c = c[:, 0::2] + (c[:, 1::2] - c[:, 0::2]) * fy[q]  # [., 2, p]: z = 0, 1
        c = c[:, 0] + (c[:, 1] - c[:, 0]) * fz[q]  # [., p]
        if cplx:
            torch.view_as_real(out[q])[:, 0] = c[0]
            torch.view_as_real(out[q])[:, 1] = torch.where(neg[q], -c[1], c[1])
        else:
            out[q] = c[0]
    return out.reshape(shape)


class Projector:
    """Padded Fourier-space projector of a 3D map (RELION ``relion_project`` equivalent).

    ``volume``: real-space map ``[N, N, N]`` (``[z, y, x]``, centre voxel ``N//2``). ``pad``: padding factor
    (RELION default 2). ``interpolation``: ``"trilinear"`` (default, RELION) or ``"nearest"`` (nearest
    neighbour everywhere with a ``sinc`` gridding correction, i.e. RELION's ``--NN`` with ``r_min_nn = 0``;
    RELION's default ``r_min_nn = 10`` uses trilinear below 10 pixels). ``device``:
    where the Fourier grid lives (default: the volume's device). ``dtype``: real precision of the grid
    (float32 default; complex grid of the matching complex type).

    Attributes: ``n``, ``pad`` (effective, ``padn / n``), ``padn``, ``r_max`` (``N//2``), ``R`` (grid radius
    in padded Fourier pixels), ``data`` (centred half grid ``[2R+3, 2R+3, R+2]``), ``centre`` (= ``R+1``).
    """

    def __init__(self, volume: torch.Tensor, pad: float = 2.0, interpolation: str = "trilinear",
                 device=None, dtype: torch.dtype = torch.float32):
        if volume.dim() != 3 or not (volume.shape[0] == volume.shape[1] == volume.shape[2]):
            raise ValueError(f"Projector needs a cubic volume [N, N, N], got shape {tuple(volume.shape)}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if pad < 1:
            raise ValueError(f"pad must be >= 1, got {pad}")
        dev = torch.device(device) if device is not None else volume.device
        n = volume.shape[-1]
        self.n = n
        self.interpolation = interpolation
        self.padn = padded_size(n, pad)
        self.pad = self.padn / n
        self.r_max = n // 2
        self.R = int(round(self.pad * self.r_max))
        self.centre = self.R + 1
        self.dtype = dtype
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128

        # the padded FFT runs in the grid's precision (float32 by default: ~1e-7 relative, far below the
        # interpolation error; pass dtype=torch.float64 for a double-precision grid)
        vol = volume.to(device=dev, dtype=torch.float64)
        vol = (vol / gridding_correction(n, self.padn, interpolation, 3, device=dev)).to(dtype)
        padn = self.padn
        vpad = torch.zeros((padn,) * 3, device=dev, dtype=dtype)
        s = padn // 2 - n // 2
        vpad[s:s + n, s:s + n, s:s + n] = vol
        ft = rfft3_centered(vpad)
        del vpad, vol

        R = self.R
        g = _fft_to_centred(ft, R, padn)
        del ft
        coords = torch.arange(-R - 1, R + 2, device=dev)
        xs = torch.arange(R + 2, device=dev)
        keep = (coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + xs[None, None, :] ** 2) <= R * R
        g.mul_(keep)
        self.data = g.to(cdtype).contiguous()

    @classmethod
    def from_grid(cls, data: torch.Tensor, n: int, pad: float = 2.0, interpolation: str = "trilinear"
                  ) -> "Projector":
        """A projector holding a given centred padded half grid ``data`` ``[2R+3, 2R+3, R+2]`` (the layout of
        :attr:`data`, e.g. a gradient-updated reference; ``R = round(pad'·(n//2))`` with the effective pad)."""
        self = cls.__new__(cls)
        self.n = int(n)
        self.interpolation = interpolation
        self.padn = padded_size(n, pad)
        self.pad = self.padn / n
        self.r_max = n // 2
        self.R = int(round(self.pad * self.r_max))
        self.centre = self.R + 1
        size = 2 * self.R + 3
        if tuple(data.shape) != (size, size, self.R + 2):
            raise ValueError(f"grid of shape {tuple(data.shape)} does not match box {n}, pad {pad} "
                             f"(expected {(size, size, self.R + 2)})")
        self.dtype = torch.float32 if data.dtype == torch.complex64 else torch.float64
        self.data = data.contiguous()
        return self

    def to_volume(self) -> torch.Tensor:
        """The real-space map ``[n, n, n]`` whose projector this is (exact inverse of the constructor for the
        frequencies kept: inverse FFT of the padded grid, window to the box, times the gridding correction)."""
        n, padn = self.n, self.padn
        G = _centred_to_fft(self.data, self.R, padn)
        vol = torch.fft.fftshift(torch.fft.irfftn(G, s=(padn, padn, padn), dim=(0, 1, 2)), dim=(0, 1, 2))
        s = padn // 2 - n // 2
        vol = vol[s:s + n, s:s + n, s:s + n].to(torch.float64)
        vol = vol * gridding_correction(n, padn, self.interpolation, 3, device=vol.device)
        return vol.to(torch.float32)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def project(self, rotations: torch.Tensor, shifts_px: torch.Tensor | None = None, r_max: float | None = None,
                chunk_pixels: int = 1 << 21) -> torch.Tensor:
        """Centred half-complex FTs ``[B, N, N//2+1]`` of the projections for ``rotations`` ``[B, 3, 3]``
        (RELION matrices ``A``; a single ``[3, 3]`` is accepted and gives ``B = 1``).

        ``shifts_px`` ``[B, 2]`` = ``(dx, dy)`` pixels moves the projected content by ``+shift`` (as
        :func:`cryopipe.core.fourier.phase_shift_2d`, except that the Nyquist row counts as ``ky = +N/2``, as
        in RELION); **to predict a particle with origin ``o`` (pixels) pass ``-o``**. ``r_max`` (Fourier pixels,
        default ``N//2``): coefficients with ``|k| > r_max`` are zero.
        Orientations are processed in chunks of at most ``chunk_pixels`` sampled coefficients (memory bound; at
        most 2¹⁸ on CPU).
        """
        n = self.n
        dev = self.device
        rot = rotations.to(device=dev, dtype=torch.float64)
        if rot.dim() == 2:
            rot = rot[None]
        if rot.dim() != 3 or rot.shape[-2:] != (3, 3):
            raise ValueError(f"rotations must be [B, 3, 3], got {tuple(rotations.shape)}")
        B = rot.shape[0]
        sh = None
        if shifts_px is not None:
            sh = shifts_px.to(device=dev, dtype=torch.float64)
            if sh.dim() == 1:
                sh = sh[None].expand(B, 2)
            if sh.shape != (B, 2):
                raise ValueError(f"shifts_px must be [B, 2] with B = {B}, got {tuple(shifts_px.shape)}")
        rm = float(self.r_max) if r_max is None else min(float(r_max), float(self.r_max))
        flat, k = slice_coordinates(n, rm, device=dev)
        M = flat.numel()
        half = n // 2 + 1
        out = torch.zeros((B, n * half), dtype=self.data.dtype, device=dev)
        if M > 0 and B > 0:
            cap = _CHUNK_POINTS if dev.type == "cpu" else chunk_pixels
            step = max(1, min(chunk_pixels, cap) // M)
            kT = k.T.contiguous()  # [2, M] float64
            krT = k.to(self.dtype).T.contiguous()
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                # p = pad * (kx * A[0, :] + ky * A[1, :])  ==  pad * A^T (kx, ky, 0); planes [3 (x, y, z), b, M]
                a = (rot[b0:b1, :2, :] * self.pad).permute(2, 0, 1)  # [3, b, 2]
                pts = torch.matmul(a, kT).to(self.dtype)
                vals = _sample_half_grid(self.data, self.centre, pts[0], pts[1], pts[2], self.interpolation)
                if sh is not None:
                    # content moves by +shift: multiply by exp(-2 pi i k.s / N); the Nyquist row is +N/2 as in
                    # RELION's shiftImageInFourierTransform (matters for the (0, N/2) coefficient only)
                    phase = (-2.0 * math.pi / n) * (sh[b0:b1].to(self.dtype) @ krT)  # [b, M]
                    vals = vals * torch.polar(torch.ones_like(phase), phase)
                out[b0:b1].index_copy_(1, flat, vals)
        return out.reshape(B, n, half)

    def project_images(self, rotations: torch.Tensor, shifts_px: torch.Tensor | None = None,
                       r_max: float | None = None) -> torch.Tensor:
        """Real-space projections ``[B, N, N]`` (line integrals along z of the rotated map; see :meth:`project`)."""
        return irfft2_centered(self.project(rotations, shifts_px, r_max), self.n)

"""Fourier-space back-projector and reconstruction (RELION ``BackProjector`` / ``relion_reconstruct`` semantics).

Sufficient statistics (they **add**: between batches, workers or half-sets, :meth:`BackProjector.merge`):

* ``data``: ``Σ CTF·X̂`` and ``weight``: ``Σ CTF²`` on the padded, centred half grid ``[2R+3, 2R+3, R+2]``
  (``z, y`` index = coordinate + ``R+1``, ``x >= 0``), ``R = round(pad·r_max)``. Image coefficient ``k``
  (Fourier pixels, ``|k| <= r_max``) is placed at ``p = pad·Aᵀ·(kx, ky, 0)`` — the point the projector samples
  (:mod:`cryopipe.core.projector`) — with trilinear weights onto the 8 neighbouring voxels (nearest-neighbour
  optional); points with ``p_x < 0`` are stored at ``−p`` with the conjugated value. As RELION, image rows
  ``0 … N//2`` are ``ky >= 0`` and on the ``kx = 0`` column only ``ky >= 0`` is inserted (the rest is its
  Hermitian duplicate).

Reconstruction (:meth:`BackProjector.reconstruct`), re-derived from RELION 5 ``BackProjector::reconstruct``
with ``skip_gridding`` (the default of ``relion_reconstruct`` in RELION 4/5; the iterative
``--dont_skip_gridding`` pre-weighting is not implemented):

1. Hermitian symmetry on the ``x = 0`` plane: each pair ``(0, y, z)``/``(0, −y, −z)`` gets the sum of both
   (conjugated) entries, weights summed (RELION ``enforceHermitianSymmetry``).
2. Point-group symmetry (optional): ``Σ_g stats(g·p)`` over the operators, trilinear interpolation in the half
   grid, within ``|p| <= R`` (RELION ``applyPointGroupSymmetry``).
3. Optional Wiener/MAP term: ``weight += 1/(pad³·T·tau2[shell])`` with ``shell = round(|p|/pad)``
   (``T = tau2_fudge``; shells with ``tau2 == 0`` get ``1/(0.001·weight)``).
4. Without a prior, RELION's regularisation of empty voxels: ``weight := max(weight, w̄_s/1000)`` with ``w̄_s``
   the mean weight in shell ``s = floor(|p|/pad)`` (clamped to ``r_max − 1``); then ``F = data / weight``.
5. ``F`` is cut to the ``pad·N`` FFT grid (padded-Nyquist planes from the ``+`` side), inverse transformed,
   and the central ``N³`` window kept (no extra scale factor: with :mod:`cryopipe.core.fourier`'s unnormalised
   forward FFT this gives RELION's absolute scale).
6. RELION ``softMaskOutsideMap`` (radius ``N/2``, 3-voxel raised cosine; outside replaced by the mean of the
   edge region), then the gridding correction: division by ``sinc²(r/(pad·N))`` (trilinear) or
   ``sinc(r/(pad·N))`` (nearest).

``relion_reconstruct`` also zeroes the DC term of every image before insertion: pass ``zero_dc=True`` to
:meth:`BackProjector.insert` for RELION-identical output.
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.projector import (
    _centred_to_fft,
    gridding_correction,
    interpolate_half_grid,
    padded_size,
    slice_coordinates,
)
from cryopipe.errors import CryopipeError

__all__ = ["BackProjector", "soft_mask_outside_map"]

_INTERPOLATIONS = ("trilinear", "nearest")


def _ceil_px(r: float) -> int:
    """Integer radius in Fourier pixels, rounded up (RELION: ``CEIL(N·apix/maxres)``), tolerant to float noise."""
    return int(math.ceil(float(r) - 1e-6))


def soft_mask_outside_map(vol: torch.Tensor, radius: float | None = None, cosine_width: float = 3.0) -> torch.Tensor:
    """RELION ``softMaskOutsideMap``: voxels beyond ``radius + cosine_width`` (default radius ``N/2``; distances
    in voxels from the centre ``N//2``) are replaced by the background value, the ``cosine_width`` band is
    blended with a raised cosine. The background value is the raised-cosine-weighted mean of the map over
    ``r >= radius``. Works for 2D ``[N, N]`` and 3D ``[N, N, N]``; returns a new tensor."""
    n = vol.shape[-1]
    if radius is None or radius < 0:
        radius = n / 2.0
    c = torch.arange(n, device=vol.device, dtype=torch.float64) - n // 2
    if vol.dim() == 3:
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    else:
        r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    radius_p = radius + cosine_width
    w = torch.where(r > radius_p, torch.ones_like(r),
                    0.5 + 0.5 * torch.cos(math.pi * (radius_p - r) / cosine_width))
    w = torch.where(r < radius, torch.zeros_like(r), w)
    v = vol.to(torch.float64)
    tot = w.sum()
    bg = (w * v).sum() / tot if float(tot) > 0 else torch.zeros((), dtype=torch.float64, device=vol.device)
    return ((1.0 - w) * v + w * bg).to(vol.dtype)


class BackProjector:
    """Accumulates Fourier-slice insertions of 2D images into a padded 3D half grid and reconstructs.

    ``n``: box size of the images and of the map. ``pad``: padding factor (RELION default 2).
    ``interpolation``: ``"trilinear"`` (RELION default) or ``"nearest"``. ``r_max``: highest frequency inserted,
    Fourier pixels, rounded up to an integer as ``relion_reconstruct`` does for ``--maxres`` (default ``n//2``,
    Nyquist). ``dtype``: real precision of the accumulators (float32 default;
    float64 for very large data sets). ``device``: default :func:`cryopipe.core.device.default_device`.
    """

    def __init__(self, n: int, pad: float = 2.0, interpolation: str = "trilinear", r_max: float | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        from cryopipe.core.device import resolve_device

        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if n < 2:
            raise ValueError(f"box size must be >= 2, got {n}")
        self.n = int(n)
        self.interpolation = interpolation
        self.padn = padded_size(n, pad)
        self.pad = self.padn / n
        self.r_max = n // 2 if r_max is None else max(1, min(_ceil_px(r_max), n // 2))
        self.R = int(round(self.pad * self.r_max))
        self.centre = self.R + 1
        self.dtype = dtype
        dev = resolve_device(device)
        size = 2 * self.R + 3
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.data = torch.zeros((size, size, self.R + 2), dtype=cdtype, device=dev)
        self.weight = torch.zeros((size, size, self.R + 2), dtype=dtype, device=dev)
        flat, k = slice_coordinates(self.n, self.r_max, device=dev)
        # RELION backproject2Dto3D: rows >= N//2+1 are negative ky and skip kx == 0 (Hermitian duplicates)
        half = self.n // 2 + 1
        rows = flat // half
        keep = ~((rows >= half) & (k[:, 0] == 0))
        self._flat = flat[keep]
        self._k = k[keep]
        self._kT = self._k.T.contiguous()  # [2, M] float64

    @property
    def device(self) -> torch.device:
        return self.data.device

    # ------------------------------------------------------------------------------------------------------
    def insert(self, ft_images: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, zero_dc: bool = False, chunk_pixels: int = 1 << 21) -> None:
        """Insert images given as centred half-complex FTs ``[B, N, N//2+1]`` (already translated so that
        they align with the reference projection, i.e. shifted by ``+origin``) for RELION matrices
        ``rotations`` ``[B, 3, 3]``.

        Adds ``CTF·X`` to ``data`` and ``CTF²`` to ``weight`` (``ctf`` ``[B, N, N//2+1]`` or broadcastable;
        ``None`` = 1). ``weights`` (``[B]`` or broadcastable to the images, e.g. ``1/σ²`` per coefficient)
        multiply both terms. ``zero_dc=True`` zeroes each image's ``(0, 0)`` coefficient first, as
        ``relion_reconstruct`` does. Batched: orientations are taken in chunks of at most ``chunk_pixels``
        coefficients (memory bound; at most 2¹⁸ on CPU), each scattered in cache-sized pieces on CPU.
        """
        n = self.n
        dev = self.device
        if ft_images.dim() == 2:
            ft_images = ft_images[None]
        if ft_images.shape[-2:] != (n, n // 2 + 1):
            raise ValueError(f"ft_images must be [B, {n}, {n // 2 + 1}], got {tuple(ft_images.shape)}")
        B = ft_images.shape[0]
        rot = rotations.to(device=dev, dtype=torch.float64)
        if rot.dim() == 2:
            rot = rot[None]
        if rot.shape != (B, 3, 3):
            raise ValueError(f"rotations must be [{B}, 3, 3], got {tuple(rotations.shape)}")
        rdt = self.dtype
        cdt = self.data.dtype
        # index_select: an order of magnitude faster than advanced indexing of complex tensors on CPU
        X = ft_images.to(device=dev).reshape(B, -1).index_select(1, self._flat).to(cdt)
        if zero_dc:
            X = torch.where((self._flat == 0)[None], torch.zeros((), dtype=cdt, device=dev), X)
        if ctf is not None:
            c = torch.broadcast_to(ctf.to(device=dev), (B, n, n // 2 + 1)).reshape(B, -1).index_select(1, self._flat)
            c = c.to(rdt)
            X = X * c
            W = c * c
        else:
            W = torch.ones((B, self._flat.numel()), dtype=rdt, device=dev)
        if weights is not None:
            wt = weights.to(device=dev, dtype=rdt)
            if wt.dim() <= 1:
                wt = wt.reshape(-1, 1) if wt.dim() == 1 else wt
                wt = torch.broadcast_to(wt, W.shape)
            else:
                wt = torch.broadcast_to(wt, (B, n, n // 2 + 1)).reshape(B, -1).index_select(1, self._flat)
            X = X * wt
            W = W * wt
        M = self._flat.numel()
        if M == 0 or B == 0:
            return
        cap = self._CHUNK_POINTS if dev.type == "cpu" else chunk_pixels
        step = max(1, min(chunk_pixels, cap) // M)
        dflat = self.data.view(-1)
        wflat = self.weight.view(-1)
        for b0 in range(0, B, step):
            self._insert_chunk(rot[b0:b0 + step], X[b0:b0 + step], W[b0:b0 + step], dflat, wflat)

    # points per piece of the 8-corner expansion and scatter-adds in :meth:`insert`: the [8, piece] work arrays
    # stay in cache and below torch's 32768-element parallel grain, so these kernels run inline without an
    # OpenMP region each (with shared cores every region can wait a scheduler time slice for its second
    # thread; the scatter-add itself is single-threaded anyway)
    _SUB_POINTS = 4000
    # at most this many coefficients per chunk (also bounded by chunk_pixels): per-point arrays of a few MB, reused
    # from the heap rather than freshly mapped (page faults), still few parallel kernels
    _CHUNK_POINTS = 1 << 18

    def _index_dtype(self) -> torch.dtype:
        # int32 indices halve the index memory traffic
        return torch.int32 if self.weight.numel() + 8 < 2**31 else torch.int64

    def insert_points(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor,
                      freqs: torch.Tensor, chunk_pixels: int = 1 << 21) -> None:
        """Insert coefficients given at explicit frequencies: ``values [B, M]`` (complex; added to ``data`` as
        they are) and ``weights [B, M]`` (added to ``weight``) at ``pad·Aᵀ·k`` for RELION matrices ``rotations
        [B, 3, 3]`` and frequencies ``freqs [M, D]`` (Fourier pixels; ``D = 3``: coefficients of a 3D volume in
        its own frame, e.g. pseudo-subtomograms; ``D = 2``: a slice). Each coefficient is inserted once (its
        Hermitian mate is implied); frequencies beyond ``r_max`` are skipped."""
        dev = self.device
        k = freqs.to(device=dev, dtype=torch.float64)
        keep = k.square().sum(-1) <= self.r_max * self.r_max + 1e-9
        kT = k[keep].T.contiguous()
        X = values.to(dev)[:, keep].to(self.data.dtype)
        W = weights.to(dev)[:, keep].to(self.dtype)
        rot = rotations.to(device=dev, dtype=torch.float64).reshape(-1, 3, 3)
        B, M = W.shape
        if M == 0 or B == 0:
            return
        cap = self._CHUNK_POINTS if dev.type == "cpu" else chunk_pixels
        step = max(1, min(chunk_pixels, cap) // M)
        for b0 in range(0, B, step):
            self._insert_chunk(rot[b0:b0 + step], X[b0:b0 + step], W[b0:b0 + step], self.data.view(-1),
                               self.weight.view(-1), kT)

    def _insert_chunk(self, rot: torch.Tensor, X: torch.Tensor, W: torch.Tensor, dflat: torch.Tensor,
                      wflat: torch.Tensor, kT: torch.Tensor | None = None) -> None:
        """Scatter-add image coefficients ``X`` ``[b, M]`` (complex) and weights ``W`` ``[b, M]`` for RELION
        matrices ``rot`` ``[b, 3, 3]`` (float64) into the flat views ``dflat`` (complex) and ``wflat``.

        Per-point work is done on the whole chunk (few large kernels), the 8-corner expansion and the
        scatter-adds in pieces of about ``_SUB_POINTS`` points (cache-sized). Work arrays are planar
        (``[corner, image, pixel]``); the scatter-adds take the entries corner by corner, so per voxel the float
        sums are the same terms as a pixel-by-pixel insertion in another order (differences at the
        accumulator's rounding level, ~1e-7 relative in float32)."""
        Z, Y, Xs = self.weight.shape
        rdt = self.dtype
        idt = self._index_dtype()
        b, M = W.shape
        # p = pad·Aᵀ(kx, ky, 0) in float64, rounded to the accumulator precision; planes [3 (x, y, z), b, M]
        # (explicit frequencies kT [D, M]: pad·Aᵀ·k)
        kT = self._kT if kT is None else kT
        a = (rot[:, :kT.shape[0], :] * self.pad).permute(2, 0, 1)  # [3, b, D]
        pts = torch.matmul(a, kT).to(rdt)
        if self.interpolation == "nearest":
            pts = torch.sign(pts) * torch.floor(pts.abs() + 0.5)  # round half away from zero, mate after rounding
        neg = pts[0] < 0  # [b, M]: stored at -p with the conjugated value
        s = torch.where(neg, -1.0, 1.0).to(rdt)
        pts = pts * s
        val = torch.where(neg, X.conj(), X)  # [b, M]
        if self.interpolation == "nearest":
            ii = pts.to(idt)
            ix = ii[0].clamp(0, Xs - 1)
            iy = ii[1].add(self.centre).clamp(0, Y - 1)
            iz = ii[2].add(self.centre).clamp(0, Z - 1)
            vox = ((iz * Y + iy) * Xs + ix).reshape(-1)
            dflat.index_add_(0, vox, val.reshape(-1))
            wflat.index_add_(0, vox, W.reshape(-1))
            return
        p0 = torch.floor(pts)
        fr = pts - p0  # fractional parts [3, b, M]
        ii = p0.to(idt)
        ix = ii[0].clamp(0, Xs - 2)
        iy = ii[1].add(self.centre).clamp(0, Y - 2)
        iz = ii[2].add(self.centre).clamp(0, Z - 2)
        base = ((iz * Y + iy) * Xs + ix).reshape(-1)  # [b·M]
        fr = fr.reshape(3, -1)
        val, W = val.reshape(-1), W.reshape(-1)
        offs = self._corner_offsets(idt)[:, None]
        piece = self._SUB_POINTS if dflat.device.type == "cpu" else b * M  # GPUs: few large kernels
        for q0 in range(0, b * M, piece):
            q = slice(q0, q0 + piece)
            f = fr[:, q]
            wx, wy, wz = torch.stack((1 - f, f), dim=1).unbind(0)  # per-axis (1 − f, f) planes [2, p]
            # corner weight (z, y, x) = (wz·wy)·wx, corners in the order of _corner_offsets: [8, p]
            w8 = ((wz[:, None] * wy[None, :])[:, :, None] * wx[None, None]).reshape(8, -1)
            idx = (base[q] + offs).reshape(-1)
            dflat.index_add_(0, idx, (w8 * val[q]).reshape(-1))
            wflat.index_add_(0, idx, (w8 * W[q]).reshape(-1))

    def _corner_offsets(self, idt: torch.dtype) -> torch.Tensor:
        """Flat offsets ``[8]`` of the trilinear corners ``(dz, dy, dx)``, ``dx`` fastest."""
        Z, Y, Xs = self.weight.shape
        d = torch.tensor([0, 1], device=self.device, dtype=idt)
        return (d[:, None, None] * (Y * Xs) + d[None, :, None] * Xs + d[None, None, :]).reshape(8)

    def merge(self, other: "BackProjector") -> "BackProjector":
        """Add another back-projector's statistics (same box, padding, r_max, interpolation) into this one."""
        if (other.n, other.padn, other.R, other.interpolation) != (self.n, self.padn, self.R, self.interpolation):
            raise CryopipeError(
                f"cannot merge back-projectors with different set-ups (box/pad/r_max/interpolation "
                f"{(other.n, other.padn, other.r_max, other.interpolation)} vs "
                f"{(self.n, self.padn, self.r_max, self.interpolation)}); use identical parameters"
            )
        self.data += other.data.to(device=self.device, dtype=self.data.dtype)
        self.weight += other.weight.to(device=self.device, dtype=self.weight.dtype)
        return self

    def clear(self) -> None:
        """Reset the statistics to zero."""
        self.data.zero_()
        self.weight.zero_()

    # ------------------------------------------------------------------------------------------------------
    def _grid_coords(self, dtype: torch.dtype = torch.float64):
        R = self.R
        dev = self.device
        cc = torch.arange(-R - 1, R + 2, device=dev, dtype=dtype)
        xs = torch.arange(R + 2, device=dev, dtype=dtype)
        zz, yy, xx = torch.meshgrid(cc, cc, xs, indexing="ij")
        return xx, yy, zz

    @staticmethod
    def _enforce_hermitian(data: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = data.clone()
        w = weight.clone()
        c = d.shape[0] // 2
        p = data[:, :, 0]
        q = weight[:, :, 0]
        dp = p + torch.flip(p, dims=(0, 1)).conj()
        wp = q + torch.flip(q, dims=(0, 1))
        dp[c, c] = p[c, c]
        wp[c, c] = q[c, c]
        d[:, :, 0] = dp
        w[:, :, 0] = wp
        return d, w

    def _symmetrise(self, data, weight, ops: torch.Tensor):
        eye = torch.eye(3, dtype=torch.float64, device=self.device)
        ops = ops.to(device=self.device, dtype=torch.float64).reshape(-1, 3, 3)
        nonid = [g for g in ops if not torch.allclose(g, eye, atol=1e-6)]
        if not nonid:
            return data, weight
        xx, yy, zz = self._grid_coords()
        inside = (xx * xx + yy * yy + zz * zz) <= self.R * self.R
        pts = torch.stack([xx[inside], yy[inside], zz[inside]], dim=-1)  # [P, 3]
        sd = data.clone()
        sw = weight.clone()
        add_d = torch.zeros(pts.shape[0], dtype=data.dtype, device=self.device)
        add_w = torch.zeros(pts.shape[0], dtype=weight.dtype, device=self.device)
        for g in nonid:
            q = (pts @ g.T).to(self.dtype)  # g·p
            add_d += interpolate_half_grid(data, self.centre, q, "trilinear")
            add_w += interpolate_half_grid(weight, self.centre, q, "trilinear")
        sd[inside] += add_d
        sw[inside] += add_w
        return sd, sw

    def fourier_estimate(self, tau2: torch.Tensor | None = None, tau2_fudge: float = 1.0,
                         symmetry: torch.Tensor | None = None, r_max: float | None = None) -> torch.Tensor:
        """Regularised Fourier estimate ``data / weight_eff`` on the centred padded half grid (steps 1–4 of
        the module description; arguments as :meth:`reconstruct`). Complex ``[2R+3, 2R+3, R+2]``."""
        pad = self.pad
        dev = self.device
        data, weight = self._enforce_hermitian(self.data, self.weight)
        if symmetry is not None:
            data, weight = self._symmetrise(data, weight, symmetry)
        rmax = self.r_max if r_max is None else max(1, min(_ceil_px(r_max), self.r_max))
        Rr = int(round(rmax * pad))
        wdt = self.dtype  # working precision of full-grid arrays (integer r² is exact in float32 here)
        xx, yy, zz = self._grid_coords(wdt)
        r2 = xx * xx + yy * yy + zz * zz
        del xx, yy, zz
        rr = torch.sqrt(r2)
        inside = r2 <= Rr * Rr
        data = torch.where(inside, data, torch.zeros((), dtype=data.dtype, device=dev))
        w = torch.where(inside, weight, torch.zeros((), dtype=weight.dtype, device=dev))

        if tau2 is not None:
            t2 = torch.as_tensor(tau2, dtype=torch.float64, device=dev).reshape(-1).to(wdt)
            if bool((t2 < 0).any()):
                raise CryopipeError("reconstruct: tau2 has negative values; the signal power per shell must be >= 0")
            ires = torch.round(rr / pad).long()
            strict = (r2 < Rr * Rr) & (ires < t2.numel())
            tv = t2[ires.clamp(max=t2.numel() - 1)]
            inv_tau = torch.where(tv > 0, 1.0 / (pad ** 3 * tau2_fudge * torch.where(tv > 0, tv, 1.0)),
                                  torch.where(w > 1e-20, 1.0 / (0.001 * torch.where(w > 1e-20, w, 1.0)),
                                              torch.zeros_like(w)))
            w = torch.where(strict, w + inv_tau, w)

        # RELION skip-gridding regularisation: floor the weight at 1/1000 of its shell average
        sh = torch.floor(rr / pad).long().clamp(max=rmax - 1)
        in_avg = r2 < Rr * Rr
        s_sum = torch.zeros(rmax, dtype=torch.float64, device=dev).index_add_(
            0, sh[in_avg], w[in_avg].to(torch.float64))
        s_cnt = torch.zeros(rmax, dtype=torch.float64, device=dev).index_add_(
            0, sh[in_avg], torch.ones(int(in_avg.sum()), dtype=torch.float64, device=dev))
        floor = (s_sum / (1000.0 * s_cnt.clamp(min=1.0))).to(wdt)
        w_eff = torch.maximum(w, floor[sh])
        return torch.where(w_eff > 0, data / torch.where(w_eff > 0, w_eff, 1.0).to(data.real.dtype),
                           torch.zeros((), dtype=data.dtype, device=dev))

    def reconstruct(self, tau2: torch.Tensor | None = None, tau2_fudge: float = 1.0,
                    symmetry: torch.Tensor | None = None, r_max: float | None = None) -> torch.Tensor:
        """Real-space map ``[N, N, N]`` (float32, centre voxel ``N//2``, RELION ``relion_reconstruct`` scale).

        ``tau2`` ``[N//2+1]``: signal power per shell (same units as ``1/weight``, i.e. of ``|V̂|²`` in the
        convention of :mod:`cryopipe.core.fourier` when the weights are ``CTF²/σ²``), giving the Wiener
        estimate ``data / (weight + 1/(pad³·tau2_fudge·tau2))``; without it RELION's ``max(weight, w̄/1000)``
        regularisation. ``symmetry`` ``[n, 3, 3]``: the point group's operators (e.g.
        :func:`cryopipe.core.symmetry.symmetry_operators`; identity entries are skipped — the statistics
        themselves are the identity term). ``r_max`` (Fourier pixels, rounded up): frequencies beyond are zeroed.
        The accumulated statistics are not modified.
        """
        n, R = self.n, self.R
        dev = self.device
        F = self.fourier_estimate(tau2, tau2_fudge, symmetry, r_max)

        # Window onto the padn FFT grid (+padn/2 Nyquist planes kept, as RELION's windowFourierTransform)
        padn = self.padn
        G = _centred_to_fft(F, R, padn)
        vol = torch.fft.irfftn(G, s=(padn, padn, padn), dim=(0, 1, 2))
        vol = torch.fft.fftshift(vol, dim=(0, 1, 2))
        s = padn // 2 - n // 2
        vol = vol[s:s + n, s:s + n, s:s + n]
        vol = soft_mask_outside_map(vol)
        vol = vol / gridding_correction(n, padn, self.interpolation, 3, device=dev)
        return vol.to(torch.float32)

"""Fourier-slice insertion into unpadded half-complex volumes, the two ways RELION's tomography programs do it.

* :func:`gather_insert_slices` (``relion_tomo_reconstruct_particle``): every 3D voxel within one voxel of a slice's
plane takes the
bilinearly interpolated value of the 2D Fourier transform, weighted by ``1 − |distance|`` (a tent of width 2
across the plane). This is the insertion RELION's tomography programs use (``relion_tomo_reconstruct_particle``);
the single-particle :class:`cryopipe.core.backprojector.BackProjector` instead splats slices with trilinear
weights into a padded grid.
* :func:`splat_insert_slices` (``relion_tomo_subtomo``): every slice pixel is spread over its 8 neighbouring
  voxels with trilinear weights (times the slice's area scale), and the sum of those weights is kept as the
  *multiplicity*.

Layout: the accumulators are half-complex volumes ``[n, n, n//2+1]`` (z, y, x) of an ``n³`` box in
:mod:`cryopipe.core.fourier`'s convention (phase origin at the centre voxel ``n//2``; index ``i`` ↔ frequency
``fftfreq(n)·n``). Slices are half-complex images ``[M, n, n//2+1]`` of ``n × n`` images (same convention).

Geometry: slice ``m`` with matrix ``A_m`` (RELION single-particle matrix, reference → image) holds
``V̂(A_mᵀ·(kx, ky, 0))``, so voxel frequency ``k`` lies at image coordinates ``(A_m·k)_xy`` and at distance
``(A_m·k)_z`` from the plane. Rather than testing every voxel against every slice, the voxels near the plane are
enumerated: for the two axes along which the plane's normal is smallest every pair of coordinates is visited and
the ≤ 4 integer values of the third coordinate inside the slab ``|n·k| < 1`` are solved for.
"""

from __future__ import annotations

import torch

__all__ = ["gather_insert_slices", "splat_insert_slices"]


def _slab_voxels(normals: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer voxel frequencies ``[M, G, 3]`` (x, y, z) near each plane and their validity ``[M, G]``.

    ``normals``: ``[M, 3]`` unit plane normals (row 2 of each slice matrix). Voxels kept: ``|normal·k| < 1``,
    ``0 <= kx <= n//2``, ``−n//2 <= ky, kz < n − n//2`` (one period of the FFT grid)."""
    device, dtype = normals.device, normals.dtype
    m = normals.shape[0]
    dominant = normals.abs().argmax(dim=1)  # [M]
    others = torch.tensor([[1, 2], [0, 2], [0, 1]], device=device)[dominant]  # [M, 2]
    half = n // 2
    coords = torch.arange(-half, n - half, device=device, dtype=dtype)
    u, v = torch.meshgrid(coords, coords, indexing="ij")
    u, v = u.reshape(1, -1), v.reshape(1, -1)  # [1, n²]
    n_d = normals.gather(1, dominant[:, None])  # [M, 1]
    n_a = normals.gather(1, others[:, :1])
    n_b = normals.gather(1, others[:, 1:])
    rest = n_a * u + n_b * v  # [M, n²]
    low = torch.minimum((-1.0 - rest) / n_d, (1.0 - rest) / n_d)
    high = torch.maximum((-1.0 - rest) / n_d, (1.0 - rest) / n_d)
    t = torch.ceil(low)[..., None] + torch.arange(4, device=device, dtype=dtype)  # [M, n², 4]
    valid = (t > low[..., None]) & (t < high[..., None])
    values = torch.stack([u[..., None].expand_as(t), v[..., None].expand_as(t), t], dim=-1)  # [M, n², 4, 3]
    axes = torch.cat([others, dominant[:, None]], dim=1)  # [M, 3]: the axis each value belongs to
    k = torch.empty_like(values).scatter_(-1, axes[:, None, None, :].expand_as(values), values)
    k = k.reshape(m, -1, 3)
    valid = valid.reshape(m, -1)
    valid &= (k[..., 0] >= 0) & (k[..., 0] <= half)
    valid &= (k[..., 1] >= -half) & (k[..., 1] < n - half) & (k[..., 2] >= -half) & (k[..., 2] < n - half)
    return k, valid


def _bilinear_half(slices: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                   hermitian: bool) -> torch.Tensor:
    """Bilinear samples of half-complex images ``slices`` ``[M, n, n//2+1]`` at frequency ``(x, y)`` (``x >= 0``)
    for the points ``index`` ``[P]`` (which slice); neighbours beyond the last column are clipped to it, rows
    wrap. ``hermitian``: the slices are complex (else real weights)."""
    n, half = slices.shape[-2], slices.shape[-1]
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx, fy = x - x0, y - y0
    x0 = x0.long().clamp(0, half - 1)
    x1 = (x0 + 1).clamp(max=half - 1)
    y0 = y0.long()
    r0, r1 = y0 % n, (y0 + 1) % n
    flat = slices.reshape(slices.shape[0], -1)

    def at(r, c):
        return flat[index, r * half + c]

    return ((1 - fy) * ((1 - fx) * at(r0, x0) + fx * at(r0, x1))
            + fy * ((1 - fx) * at(r1, x0) + fx * at(r1, x1)))


def gather_insert_slices(data: torch.Tensor, weight: torch.Tensor, slices: torch.Tensor,
                         slice_weights: torch.Tensor, matrices: torch.Tensor, chunk: int = 64) -> None:
    """Add ``M`` Fourier slices into the accumulators, in place.

    ``data``: complex ``[n, n, n//2+1]``; ``weight``: real ``[n, n, n//2+1]``; ``slices``: complex
    ``[M, n, n//2+1]`` (already multiplied by CTF·dose etc.); ``slice_weights``: real ``[M, n, n//2+1]`` (e.g.
    ``(CTF·dose)²``); ``matrices``: ``[M, 3, 3]`` rotations. Each voxel ``k`` with ``|(A·k)_z| < 1`` gets
    ``(1 − |(A·k)_z|)·slice((A·k)_xy)`` (conjugated sample at ``−(A·k)_xy`` where ``(A·k)_x < 0``), provided
    ``|(A·k)_x| < n//2+1`` and ``|(A·k)_y| < n/2+1``. Slices are processed ``chunk`` at a time (memory
    ``≈ chunk·4·n²`` candidate voxels)."""
    n = data.shape[0]
    half = n // 2 + 1
    rdtype = weight.dtype
    flat_data = data.view(-1)
    flat_weight = weight.view(-1)
    for start in range(0, slices.shape[0], chunk):
        A = matrices[start:start + chunk].to(device=data.device, dtype=torch.float64)
        k, valid = _slab_voxels(A[:, 2, :], n)
        p = torch.einsum("mij,mgj->mgi", A, k)
        which, point = torch.nonzero(valid, as_tuple=True)
        p = p[which, point]
        kv = k[which, point].long()
        inside = (p[:, 0].abs() < half) & (p[:, 1].abs() < n / 2 + 1)
        which, p, kv = which[inside], p[inside], kv[inside]
        tent = (1.0 - p[:, 2].abs()).to(rdtype)
        flip = p[:, 0] < 0
        sign = torch.where(flip, -1.0, 1.0).to(p.dtype)
        px, py = p[:, 0] * sign, p[:, 1] * sign
        sl = slices[start:start + chunk]
        values = _bilinear_half(sl, px.to(rdtype), py.to(rdtype), which, True)
        values = torch.where(flip, values.conj(), values)
        wvalues = _bilinear_half(slice_weights[start:start + chunk], px.to(rdtype), py.to(rdtype), which, False)
        target = (kv[:, 2] % n) * (n * half) + (kv[:, 1] % n) * half + kv[:, 0]
        flat_data.index_add_(0, target, (values * tent).to(flat_data.dtype))
        flat_weight.index_add_(0, target, (wvalues * tent).to(rdtype))


def splat_insert_slices(data: torch.Tensor, weight: torch.Tensor, multiplicity: torch.Tensor, slices: torch.Tensor,
                        slice_weights: torch.Tensor, matrices: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                        scale: float = 1.0, volume_index: torch.Tensor | None = None) -> None:
    """Spread ``M`` Fourier slices of box ``b`` into a volume of box ``n``, in place, with multiplicity.

    ``data`` complex / ``weight``, ``multiplicity`` real: ``[n, n, n//2+1]``, or ``[V, n, n, n//2+1]`` with
    ``volume_index`` ``[M]`` naming each slice's volume (one batched call for many particles); ``slices`` complex and
    ``slice_weights`` real ``[M, b, b//2+1]``; ``matrices`` ``[M, 3, 3]`` rotations; ``scale`` = ``n/b`` (the
    3D position of slice frequency ``k`` is ``scale·Aᵀ·(kx, ky, 0)``); ``pixel_mask`` ``[M, b, b//2+1]`` bool
    selects the slice pixels inserted (e.g. where the dose weight is above a cut-off). Pixels used: ``kx >= 0``
    on rows ``ky >= 0`` and ``kx >= 1`` on rows ``ky < 0`` (the Hermitian duplicates of the ``kx = 0`` column
    are skipped; RELION's ``−b/2`` Nyquist row counts as negative). A point with negative ``x`` is mirrored
    (conjugated); each of its 8 neighbours inside the grid (``−n/2 <= y, z < n/2``) gets
    ``scale²·fx·fy·fz`` times the value / weight / 1, and a neighbour on the ``x = 0`` plane also adds the
    conjugate at ``(0, −y, −z)``."""
    n = data.shape[-2]
    half_n = n // 2 + 1
    m, b, half_b = slices.shape
    if volume_index is None:
        volume_index = torch.zeros(m, dtype=torch.long, device=slices.device)
    rows = torch.arange(b, device=slices.device)
    ky = torch.where(rows < b // 2, rows, rows - b).to(torch.float64)
    kx = torch.arange(half_b, device=slices.device, dtype=torch.float64)
    use = (kx[None, :] >= 0) & ((ky[:, None] >= 0) | (kx[None, :] >= 1))
    use = use.expand(m, b, half_b)
    if pixel_mask is not None:
        use = use & pixel_mask
    which, row, col = torch.nonzero(use, as_tuple=True)
    A = matrices.to(torch.float64)[which]
    pos = scale * (A[:, 0, :] * kx[col, None] + A[:, 1, :] * ky[row, None])
    flip = pos[:, 0] < 0
    pos = torch.where(flip[:, None], -pos, pos)
    value = slices[which, row, col]
    value = torch.where(flip, value.conj(), value)
    wvalue = slice_weights[which, row, col].to(torch.float64)
    offset = volume_index.to(slices.device)[which] * (n * n * half_n)
    base = torch.floor(pos)
    flat_d, flat_w, flat_m = data.view(-1), weight.view(-1), multiplicity.view(-1)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                g = base + torch.tensor([dx, dy, dz], dtype=torch.float64, device=pos.device)
                ok = (g[:, 0] < half_n) & (g[:, 1] >= -(n // 2)) & (g[:, 1] < n // 2) \
                    & (g[:, 2] >= -(n // 2)) & (g[:, 2] < n // 2)
                f = (1 - (pos - g).abs()).prod(dim=1) * scale * scale
                gi = g[ok].long()
                f, v, wv, off = f[ok], value[ok], wvalue[ok], offset[ok]
                target = off + (gi[:, 2] % n) * (n * half_n) + (gi[:, 1] % n) * half_n + gi[:, 0]
                flat_d.index_add_(0, target, (f * v).to(flat_d.dtype))
                flat_w.index_add_(0, target, (f * wv).to(flat_w.dtype))
                flat_m.index_add_(0, target, f.to(flat_m.dtype))
                edge = gi[:, 0] == 0
                mirror = off[edge] + ((-gi[edge, 2]) % n) * (n * half_n) + ((-gi[edge, 1]) % n) * half_n
                flat_d.index_add_(0, mirror, (f[edge] * v[edge].conj()).to(flat_d.dtype))
                flat_w.index_add_(0, mirror, (f[edge] * wv[edge]).to(flat_w.dtype))
                flat_m.index_add_(0, mirror, f[edge].to(flat_m.dtype))

"""The Fourier coefficients a likelihood calculation works on, as one flat vector per image.

The E-step and M-step of the engine never see 2D Fourier images: each image (its centred half-complex FT
``[n, n//2+1]``, :mod:`cryopipe.core.fourier`) is reduced to the ``P`` coefficients with shell
``round(|k|) <= r_max`` and flattened, so that every sum over pixels becomes a matrix product.

Conventions (RELION's ``Mresol_fine`` / ``Npix_per_shell``):

* shell of a coefficient = ``round(|k|)`` (Fourier pixels);
* the half of the ``kx = 0`` column with ``ky < 0`` (stored twice in a half-complex transform: it is the complex
  conjugate of ``ky > 0``) is excluded, so every independent coefficient is counted once;
* coefficients are ordered by increasing ``|k|`` (ties in grid order), so that the coefficient set of a smaller
  radius is a *prefix* of a larger one: ``X[..., :cs.count_upto(r)]`` is the low-resolution part.

Tilt stacks (a tomographic particle = its ``F`` tilt images, RELION 5's 2D stacks): :func:`stack_coefficient_set`
concatenates the sets of the ``F`` images, still sorted by ``|k|``, and gives every coefficient its 3D frequency
``k₃ = R_fᵀ·(kx, ky, 0)`` (``R_f`` the tilt's rotation, or tilt × subtomogram rotation). A prediction of the
particle in orientation ``A`` is then ``V̂(Aᵀ·k₃)`` for every coefficient and a 3D translation ``t`` is the phase
``exp(−2πi k₃·t/n)`` (because ``k·(R_f t)_xy = k₃·t``), so the one E-step handles stacks as images with 3D
frequencies and 3D translations.

3D pseudo-subtomograms (RELION's default tomographic particles): :func:`volume_coefficient_set` holds the
coefficients of an ``n³`` half-complex volume (``[n, n, n//2+1]`` as z, y, x, FFT order, DC at index 0) with
``k = (kx, ky, kz)``; the half of the ``kx = 0`` plane that is the complex conjugate of the other half
(of each pair ``(kz, ky) ↔ (−kz, −ky)`` the one with the larger grid index) is left out. A prediction in
orientation ``A`` is ``V̂(Aᵀ·k)`` (the reference rotated in 3D, no central slice) and a 3D translation the phase
``exp(−2πi k·t/n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CoefficientSet", "coefficient_set", "stack_coefficient_set", "volume_coefficient_set"]


@dataclass(frozen=True)
class CoefficientSet:
    """``P`` half-complex coefficients of an ``n × n`` image with shell ``<= r_max`` (see module docstring).

    Attributes:
        n: image box (pixels).
        r_max: largest shell index included (Fourier pixels).
        flat: ``[P]`` long, index into the flattened ``[n, n//2+1]`` half grid.
        k: ``[P, 2]`` float32 frequency ``(kx, ky)`` in Fourier pixels (tilt stacks: ``[P, 3]``, ``k₃``).
        shell: ``[P]`` long, ``round(|k|)``.
        radius: ``[P]`` float32 ``|k|`` (ascending).
    """

    n: int
    r_max: int
    flat: torch.Tensor
    k: torch.Tensor
    shell: torch.Tensor
    radius: torch.Tensor
    n_images: int = 1  #: tilt stacks: ``F`` images per particle (``flat`` indexes the flattened ``[F, n, n//2+1]``)
    image_rotations: torch.Tensor | None = None  #: tilt stacks: ``[F, 3, 3]`` the ``R_f`` that made ``k``
    volume: bool = False  #: 3D volumes: ``flat`` indexes the flattened ``[n, n, n//2+1]`` grid, ``k`` is ``[P, 3]``

    @property
    def size(self) -> int:
        """Number of coefficients ``P``."""
        return int(self.flat.numel())

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def count_upto(self, r: int) -> int:
        """Number of leading coefficients with shell ``<= r`` (the prefix that is the set of radius ``r``)."""
        return int((self.shell <= int(r)).sum().item())

    def prefix(self, r: int) -> CoefficientSet:
        """The coefficient set of the smaller radius ``r`` (a prefix of this one)."""
        m = self.count_upto(r)
        return CoefficientSet(self.n, min(int(r), self.r_max), self.flat[:m], self.k[:m], self.shell[:m],
                              self.radius[:m], self.n_images, self.image_rotations, self.volume)

    def in_box(self, m: int) -> CoefficientSet:
        """The same coefficients (same order and frequencies) indexed in an ``m × m`` image (2D sets; Fourier
        cropping or padding: frequency ``k`` keeps its index, only the box changes). ``m`` must hold every
        frequency of the set (``|ky| <= m/2 − 1``, ``kx <= m/2``)."""
        if self.volume or self.n_images != 1:
            raise ValueError("in_box is for single 2D images")
        m = int(m)
        kx = self.k[:, 0].round().long()
        ky = self.k[:, 1].round().long()
        if self.size and (int(ky.abs().max()) > m // 2 - 1 or int(kx.max()) > m // 2):
            raise ValueError(f"box {m} is too small for the coefficients of radius {self.r_max}")
        flat = (ky % m) * (m // 2 + 1) + kx
        return CoefficientSet(m, self.r_max, flat, self.k, self.shell, self.radius)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of the half-complex grid(s) the set indexes: ``(n, n//2+1)``, ``(F, n, n//2+1)`` for stacks,
        ``(n, n, n//2+1)`` for volumes."""
        g = (self.n, self.n // 2 + 1)
        if self.volume:
            return (self.n, *g)
        return g if self.n_images == 1 else (self.n_images, *g)

    def gather(self, ft: torch.Tensor) -> torch.Tensor:
        """``[..., n, n//2+1]`` half-complex grid (stacks: ``[..., F, n, n//2+1]``) → ``[..., P]`` coefficients."""
        g = self.grid_shape
        if tuple(ft.shape[-len(g):]) != g:
            raise ValueError(f"expected [..., {', '.join(map(str, g))}], got {tuple(ft.shape)}")
        return ft.reshape(*ft.shape[:-len(g)], -1)[..., self.flat]

    def scatter(self, values: torch.Tensor, hermitian: bool = True) -> torch.Tensor:
        """``[..., P]`` → ``[..., n, n//2+1]`` half grid, zero outside the set.

        With ``hermitian`` (complex values), the excluded ``kx = 0, ky < 0`` entries are filled with the complex
        conjugate of their ``ky > 0`` mates (and the real-valued weights simply copied), so that the grid is a
        consistent half-complex transform (``irfft2_centered`` gives a real image).
        """
        g = self.grid_shape
        size = 1
        for d in g:
            size *= d
        out = torch.zeros(*values.shape[:-1], size, dtype=values.dtype, device=values.device)
        out[..., self.flat] = values
        out = out.reshape(*values.shape[:-1], *g)
        if hermitian and self.volume:  # kx = 0 plane: (kz, ky) is the conjugate of (−kz, −ky)
            plane = out[..., 0]
            filled = _plane_left_out(self.n, values.device)
            mate = (-torch.arange(self.n, device=values.device)) % self.n
            flipped = plane[..., mate, :][..., :, mate]
            fill = flipped.conj() if values.is_complex() else flipped
            out = out.clone()
            out[..., 0] = torch.where(filled, fill, plane)
            return out
        if hermitian:
            col = out[..., :, 0]
            rows = torch.arange(self.n, device=values.device)
            mate = (-rows) % self.n
            neg = rows > self.n // 2  # ky < 0 rows whose mate (ky > 0) is in the set
            fill = col[..., mate].conj() if values.is_complex() else col[..., mate]
            col = torch.where(neg, fill, col)
            out = out.clone()
            out[..., :, 0] = col
        return out

    def shell_sum(self, values: torch.Tensor, n_shells: int | None = None) -> torch.Tensor:
        """Sum ``[..., P]`` real values per shell → ``[..., n_shells]`` (default ``n//2 + 1``)."""
        ns = self.n // 2 + 1 if n_shells is None else int(n_shells)
        out = torch.zeros(*values.shape[:-1], ns, dtype=values.dtype, device=values.device)
        keep = self.shell < ns
        idx = self.shell[keep]
        return out.index_add_(values.dim() - 1, idx, values[..., keep])

    def shell_counts(self, n_shells: int | None = None) -> torch.Tensor:
        """Number of coefficients per shell ``[n_shells]`` (RELION's ``Npix_per_shell`` within the set)."""
        return self.shell_sum(torch.ones(self.size, device=self.device, dtype=torch.float64), n_shells)


def coefficient_set(n: int, r_max: float, device=None) -> CoefficientSet:
    """Coefficients of an ``n × n`` image with ``round(|k|) <= r_max`` (``r_max`` in Fourier pixels), sorted by
    ``|k|``; the ``kx = 0, ky < 0`` half-column is left out (see module docstring)."""
    h = n // 2 + 1
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=torch.float64)
    kx = torch.arange(h, device=device, dtype=torch.float64)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    r = torch.sqrt(kxx * kxx + kyy * kyy).reshape(-1)
    shell = torch.round(r).long()
    redundant = ((kxx == 0) & (kyy < 0)).reshape(-1)
    keep = (shell <= int(r_max)) & ~redundant
    idx = torch.nonzero(keep).reshape(-1)
    order = torch.argsort(r[idx], stable=True)
    idx = idx[order]
    k = torch.stack([kxx.reshape(-1)[idx], kyy.reshape(-1)[idx]], dim=-1).to(torch.float32)
    return CoefficientSet(int(n), int(r_max), idx, k, shell[idx], r[idx].to(torch.float32))


def stack_coefficient_set(cset: CoefficientSet, rotations: torch.Tensor) -> CoefficientSet:
    """The coefficients of a stack of ``F`` images (see module docstring): ``cset`` repeated for every image,
    ordered by ``|k|`` (ties: image-major), ``k₃ = R_fᵀ·(kx, ky, 0)`` ``[F·P, 3]`` from ``rotations [F, 3, 3]``
    (the rotation that projects the particle's frame into image ``f``)."""
    if cset.n_images != 1:
        raise ValueError("stack_coefficient_set needs the set of one image")
    R = rotations.to(device=cset.device, dtype=torch.float64)
    F, P = int(R.shape[0]), cset.size
    grid = cset.n * (cset.n // 2 + 1)
    flat = (torch.arange(F, device=cset.device)[:, None] * grid + cset.flat[None, :]).reshape(-1)
    k3 = torch.einsum("pi,fij->fpj", cset.k.to(torch.float64), R[:, :2, :]).reshape(-1, 3)  # R_fᵀ·(kx, ky, 0)
    radius = cset.radius[None, :].expand(F, P).reshape(-1)
    order = torch.argsort(radius, stable=True)
    shell = cset.shell[None, :].expand(F, P).reshape(-1)
    return CoefficientSet(cset.n, cset.r_max, flat[order], k3[order].to(torch.float32), shell[order], radius[order],
                          F, R)


def volume_coefficient_set(n: int, r_max: float, device=None) -> CoefficientSet:
    """Coefficients of an ``n³`` half-complex volume (``[n, n, n//2+1]``, z, y, x) with ``round(|k|) <= r_max``,
    sorted by ``|k|`` (ties in grid order), ``k = (kx, ky, kz)`` ``[P, 3]`` (Fourier pixels, FFT order: index
    ``i`` is ``i`` or ``i − n``); the redundant half of the ``kx = 0`` plane (the one of each
    conjugate pair ``(kz, ky) ↔ (−kz, −ky)`` with the larger grid index) is left out (module docstring)."""
    h = n // 2 + 1
    kf = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=torch.float64)
    kx = torch.arange(h, device=device, dtype=torch.float64)
    kzz, kyy, kxx = torch.meshgrid(kf, kf, kx, indexing="ij")
    r = torch.sqrt(kxx * kxx + kyy * kyy + kzz * kzz).reshape(-1)
    shell = torch.round(r).long()
    redundant = torch.zeros(n, n, h, dtype=torch.bool, device=device)
    redundant[..., 0] = _plane_left_out(n, device)
    redundant = redundant.reshape(-1)
    keep = (shell <= int(r_max)) & ~redundant
    idx = torch.nonzero(keep).reshape(-1)
    idx = idx[torch.argsort(r[idx], stable=True)]
    k = torch.stack([kxx.reshape(-1)[idx], kyy.reshape(-1)[idx], kzz.reshape(-1)[idx]], dim=-1).to(torch.float32)
    return CoefficientSet(int(n), int(r_max), idx, k, shell[idx], r[idx].to(torch.float32), volume=True)


def _plane_left_out(n: int, device=None) -> torch.Tensor:
    """``[n, n]`` bool (z, y grid indices) of the ``kx = 0`` plane: True where the conjugate mate
    ``(−iz mod n, −iy mod n)`` has the smaller flat index (that mate is kept; self-mates are kept)."""
    i = torch.arange(n, device=device)
    own = i[:, None] * n + i[None, :]
    mate = ((-i) % n)[:, None] * n + ((-i) % n)[None, :]
    return mate < own

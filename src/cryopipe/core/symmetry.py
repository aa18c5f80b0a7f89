"""Point-group symmetry in RELION's axis conventions (``src/symmetries.cpp``, ``SymList::fill_symmetry_class``).

Each group is built, as in RELION, from the generators below and closed under multiplication:

========  =====================================================================================  =====
name      generators (axes ``(x, y, z)``)                                                        order
========  =====================================================================================  =====
C1        identity                                                                               1
Cn        n-fold about z                                                                         n
CI        inversion ``−I``                                                                       2
CS        mirror plane with normal z                                                             2
CnV       n-fold about z, mirror with normal y                                                   2n
CnH       n-fold about z, mirror with normal z                                                   2n
Sn        (n/2)-fold about z, inversion (n even)                                                 n
Dn        n-fold about z, 2-fold about x                                                         2n
DnV       Dn + mirror with normal x                                                              4n
DnH       Dn + mirror with normal z                                                              4n
T         3-fold about z, 2-fold about (0, √(2/3), √(1/3))                                       12
TD        T + mirror with normal (1.4142136, 2.4494897, 0)                                       24
TH        3-fold about z, 2-fold about (0, −√(2/3), −√(1/3)), inversion                          24
O         3-fold about (1, 1, 1)/√3, 4-fold about z (so 4-folds on x, y, z)                      24
OH        O + mirror with normal (0, 1, 1)                                                       48
I, I2     2-fold about z, 5-fold about (0.525731, 0, 0.850651), 3-fold (0, 0.356822, 0.934172)  60
I1        2-fold about x, 5-fold about (0.850651, 0, −0.525731), 3-fold (0.934172, 0.356822, 0)  60
I3        2-fold (−0.525731, 0, 0.850651), 5-fold about z, 3-fold (−0.491123, 0.356822, 0.794654) 60
I4        2-fold (0.525731, 0, 0.850651), 5-fold (0.894427, 0, 0.447214), 3-fold (0.491123, ...)   60
IH, InH   the I group + a mirror (normal x for I/I2, −z for I1, (0.85, 0, 0.53) for I3,          120
          (0.85, 0, −0.53) for I4)
========  =====================================================================================  =====

``I5`` is not defined by RELION (it stops with "Symmetry pg_I5 not implemented"); asking for it raises
:class:`~cryopipe.errors.CryopipeError`. The 2-fold axis of ``T`` is given by RELION to 6 decimals; the exact unit
vector is used here (difference < 1e-6).

A volume ``V`` has symmetry ``G`` when ``V(R·x) = V(x)`` for every operator ``R`` (``x = (x, y, z)`` about the
box centre ``N//2``). Operators are returned as ``[n, 3, 3]`` matrices acting on column vectors, identity first;
the set is closed under products and inverses, so the direction in which each element is applied does not matter
for averaging or for asymmetric units.
"""

from __future__ import annotations

import math
import re

import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.volume_rotation import rotate_volume
from cryopipe.errors import CryopipeError

__all__ = ["symmetry_operators", "symmetry_group_order", "symmetrise_volume", "canonical_symmetry_name"]

_S23, _S13 = math.sqrt(2.0 / 3.0), math.sqrt(1.0 / 3.0)

# RELION's icosahedral generator axes (symmetries.cpp gives them as 9-16 digit decimals; the exact unit vectors
# they approximate, to < 3e-8, are used so that the generated groups close to machine precision).
_PHI = (1.0 + math.sqrt(5.0)) / 2.0
_A5 = 1.0 / math.sqrt(1.0 + _PHI * _PHI)  # 0.525731112...
_B5 = _PHI / math.sqrt(1.0 + _PHI * _PHI)  # 0.850650808...
_Z53 = math.sqrt((5.0 + 2.0 * math.sqrt(5.0)) / 15.0)  # cos(angle between adjacent 5-fold and 3-fold axes)
_R53 = math.sqrt(1.0 - _Z53 * _Z53)
_X53, _Y53 = _R53 * math.cos(math.radians(144.0)), _R53 * math.sin(math.radians(144.0))
_ICOS = {
    # RELION: 2-fold (0,0,1); 5-fold (0.525731114, 0, 0.850650807); 3-fold (0, 0.356822076, 0.934172364)
    "I2": [("rot", 2, (0.0, 0.0, 1.0)), ("rot", 5, (_A5, 0.0, _B5)), ("rot", 3, (0.0, 1.0 / _PHI, _PHI))],
    # RELION: 2-fold (1,0,0); 5-fold (0.85065080702670, 0, -0.5257311142635); 3-fold (0.9341723640, 0.3568220765, 0)
    "I1": [("rot", 2, (1.0, 0.0, 0.0)), ("rot", 5, (_B5, 0.0, -_A5)), ("rot", 3, (_PHI, 1.0 / _PHI, 0.0))],
    # RELION: 2-fold (-0.5257311143, 0, 0.8506508070); 5-fold (0,0,1);
    #         3-fold (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
    "I3": [("rot", 2, (-_A5, 0.0, _B5)), ("rot", 5, (0.0, 0.0, 1.0)), ("rot", 3, (_X53, _Y53, _Z53))],
    # RELION: 2-fold (0.5257311143, 0, 0.8506508070); 5-fold (0.8944271932547096, 0, 0.4472135909903704);
    #         3-fold (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
    "I4": [("rot", 2, (_A5, 0.0, _B5)), ("rot", 5, (2.0, 0.0, 1.0)), ("rot", 3, (-_X53, _Y53, _Z53))],
}
# mirror normals of the IH groups
# (RELION: (1,0,0), (0,0,-1), (0.850650807, 0, 0.525731114), (0.850650807, 0, -0.525731114))
_ICOS_MIRROR = {
    "I2": (1.0, 0.0, 0.0),
    "I1": (0.0, 0.0, -1.0),
    "I3": (_B5, 0.0, _A5),
    "I4": (_B5, 0.0, -_A5),
}

# RELION's decimal generator axes, kept for the tests that compare them with the exact ones above.
RELION_ICOS_AXES = {
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)), (3, (0.0, 0.356822076, 0.934172364))],
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0.0))],
    "I3": [(2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}


def canonical_symmetry_name(name: str) -> str:
    """Upper-case RELION name, ``"I"`` → ``"I2"`` and ``"IH"`` → ``"I2H"``; raises on names RELION does not know."""
    s = str(name).strip().upper()
    if s == "I":
        return "I2"
    if s == "IH":
        return "I2H"
    _generators(s)  # validates
    return s


def _generators(s: str) -> list[tuple]:
    """Generator list for a canonical (upper-case) name, following RELION's ``fill_symmetry_class``."""
    bad = CryopipeError(
        f"unknown symmetry group {s!r} (use C1, Cn, Ci, Cs, CnV, CnH, Sn, Dn, DnV, DnH, T, TD, TH, O, OH, "
        "I/I1-I4, IH/I1H-I4H, as RELION)"
    )
    z = (0.0, 0.0, 1.0)
    m = re.fullmatch(r"([CDS])(\d+)([VH]?)", s)
    if m:
        kind, n, suffix = m.group(1), int(m.group(2)), m.group(3)
        if n < 1:
            raise bad
        if kind == "C":
            gens = [("rot", n, z)]
            if suffix == "V":
                gens.append(("mirror", (0.0, 1.0, 0.0)))
            elif suffix == "H":
                gens.append(("mirror", z))
            return gens
        if kind == "D":
            gens = [("rot", n, z), ("rot", 2, (1.0, 0.0, 0.0))]
            if suffix == "V":
                gens.append(("mirror", (1.0, 0.0, 0.0)))
            elif suffix == "H":
                gens.append(("mirror", z))
            return gens
        if suffix or n % 2:
            raise CryopipeError(f"symmetry group {s!r}: the order of an Sn group must be even (RELION), e.g. S2, S4")
        return [("rot", n // 2, z), ("inv",)]
    if s == "CI":
        return [("inv",)]
    if s == "CS":
        return [("mirror", z)]
    if s == "T":
        return [("rot", 3, z), ("rot", 2, (0.0, _S23, _S13))]
    if s == "TD":
        # RELION's mirror normal (1.4142136, 2.4494897, 0) is (√2, √6, 0) to 8 digits
        return [("rot", 3, z), ("rot", 2, (0.0, _S23, _S13)), ("mirror", (math.sqrt(2.0), math.sqrt(6.0), 0.0))]
    if s == "TH":
        return [("rot", 3, z), ("rot", 2, (0.0, -_S23, -_S13)), ("inv",)]
    if s == "O":
        return [("rot", 3, (_S13, _S13, _S13)), ("rot", 4, z)]
    if s == "OH":
        return [("rot", 3, (_S13, _S13, _S13)), ("rot", 4, z), ("mirror", (0.0, 1.0, 1.0))]
    if s in ("I5", "I5H"):
        raise CryopipeError(
            f"symmetry group {s!r} is not defined in RELION ('Symmetry pg_I5 not implemented'); "
            "use I1, I2 (= I), I3 or I4"
        )
    m = re.fullmatch(r"I([1-4])(H?)", s)
    if m:
        key = "I" + m.group(1)
        gens = list(_ICOS[key])
        if m.group(2):
            gens.append(("mirror", _ICOS_MIRROR[key]))
        return gens
    raise bad


def _rotation(axis, angle_deg: float) -> torch.Tensor:
    norm = math.sqrt(sum(float(a) * float(a) for a in axis))
    x, y, z = (float(a) / norm for a in axis)
    t = math.radians(angle_deg)
    K = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * K + (1.0 - math.cos(t)) * (K @ K)


def _generator_matrices(gens: list[tuple]) -> list[torch.Tensor]:
    mats = []
    for g in gens:
        if g[0] == "rot":
            fold, axis = g[1], g[2]
            mats += [_rotation(axis, 360.0 * j / fold) for j in range(1, fold)]
        elif g[0] == "inv":
            mats.append(-torch.eye(3, dtype=torch.float64))
        else:  # mirror plane with the given normal
            n = torch.tensor(g[1], dtype=torch.float64)
            n = n / torch.linalg.vector_norm(n)
            mats.append(torch.eye(3, dtype=torch.float64) - 2.0 * torch.outer(n, n))
    return mats


_CACHE: dict[str, torch.Tensor] = {}


def _append_new(G: torch.Tensor, cand: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``G`` plus the members of ``cand`` [m,3,3] that are not (within ``tol``) in ``G`` or earlier in ``cand``."""
    for m in cand:  # candidates are few after vectorised filtering below
        if bool((G - m).abs().amax(dim=(-1, -2)).min() >= tol):
            G = torch.cat([G, m[None]])
    return G


def _group(s: str) -> torch.Tensor:
    if s in _CACHE:
        return _CACHE[s]
    G = torch.eye(3, dtype=torch.float64)[None]
    gens = _generator_matrices(_generators(s))
    if gens:
        G = _append_new(G, torch.stack(gens))
    # close under products: add every product not yet present, until nothing new appears
    while True:
        prods = (G[:, None] @ G[None, :]).reshape(-1, 3, 3)
        dist = (prods[:, None] - G[None]).abs().amax(dim=(-1, -2)).min(dim=1).values
        new = prods[dist >= 1e-6]
        if new.shape[0] == 0:
            break
        G = _append_new(G, new)
        if G.shape[0] > 1000:
            raise CryopipeError(f"symmetry group {s!r} does not close (internal error)")
    # clean up rounding: entries within 1e-12 of 0 are snapped
    G = torch.where(G.abs() < 1e-12, torch.zeros_like(G), G)
    _CACHE[s] = G
    return G


def symmetry_operators(name: str, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All operators of point group ``name`` (RELION naming, case-insensitive) as ``[n, 3, 3]``, identity first.

    ``"I"`` is RELION's default icosahedral setting ``I2``. ``device``: ``None`` → default device.
    """
    G = _group(canonical_symmetry_name(name))
    return G.to(device=resolve_device(device), dtype=dtype)


def symmetry_group_order(name: str) -> int:
    """Number of operators of the group (C1: 1, Cn: n, Dn: 2n, T: 12, O: 24, I: 60, ...)."""
    return int(_group(canonical_symmetry_name(name)).shape[0])


def symmetrise_volume(volume: torch.Tensor, name: str, chunk: int = 4) -> torch.Tensor:
    """Average of the symmetry-related copies of a cubic volume ``[..., N, N, N]`` (real space, trilinear).

    ``Vsym(x) = (1/|G|) · Σ_R V(R·x)`` with ``x`` measured from the centre voxel ``N//2``; samples falling outside
    the box count as 0. This is RELION's ``symmetriseMap`` (real-space ``applyGeometry`` with linear
    interpolation, no wrapping). Trilinear interpolation slightly low-passes the non-identity copies.
    ``chunk`` operators are interpolated at a time (memory ~ ``chunk · N³ · 12`` bytes for the sampling grid).
    """
    if volume.ndim < 3 or not (volume.shape[-1] == volume.shape[-2] == volume.shape[-3]):
        raise CryopipeError(f"symmetrise_volume: expected a cubic volume [..., N, N, N], got {tuple(volume.shape)}")
    name_c = canonical_symmetry_name(name)
    if name_c == "C1":
        return volume.clone()
    vol = volume if volume.is_floating_point() else volume.float()
    n = vol.shape[-1]
    ops = symmetry_operators(name_c, device=vol.device, dtype=vol.dtype)
    total = vol.clone()  # identity
    for start in range(1, ops.shape[0], chunk):
        R = ops[start:start + chunk]  # [g, 3, 3]; V(R·x) = V((Rᵀ)ᵀ·x)
        total = total + rotate_volume(vol, R.transpose(-1, -2), chunk_voxels=R.shape[0] * n ** 3).sum(dim=0)
    out = total / ops.shape[0]
    return out.to(volume.dtype if volume.is_floating_point() else out.dtype)

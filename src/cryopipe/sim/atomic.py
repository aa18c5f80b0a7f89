"""Atomic model -> electrostatic-potential map (the simulator's ground truth).

Recipe (the one used for the RELION fixtures' ``ref_map.mrc``, see ``fixtures/relion/README.md`` §1):

1. read the model with gemmi, keep the first model, remove hydrogens and waters;
2. translate it so that its mass-weighted centre of mass sits at the box centre, voxel ``N // 2`` on every axis
   (i.e. at ``(N//2)·pixel_size`` Å from voxel 0) — unless ``center=False``;
3. evaluate gemmi's ``DensityCalculatorE`` (electron-scattering form factors, each atom's B plus ``blur_B``) on a
   grid ``oversample`` times finer than the target (same physical box, P1 cell);
4. Fourier-crop to ``N³`` (Nyquist planes set to zero, mean preserved), so the map is band-limited at the
   target Nyquist frequency.

Maps are returned as float32 ``[z, y, x]`` (MRC order) in arbitrary potential units.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gemmi
import numpy as np
import torch

from cryopipe.errors import CryopipeError, InputFileError

__all__ = [
    "DATA_DIR",
    "load_model",
    "potential_map",
    "symmetric_assembly",
    "model_radius",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

#: models that ship with cryopipe, by name
_BUILTIN = {"3enl": DATA_DIR / "3enl.pdb"}

#: finest grid spacing (Å) used by default for the oversampled evaluation (ref_map: 3 Å / 4 = 0.75 Å)
_MAX_FINE_SPACING_A = 0.75
#: the oversampled grid must stay below this many voxels per side (memory: 4·M³ bytes in gemmi)
_MAX_FINE_SIZE = 1024
#: the default oversampling is lowered (not below 2) to keep the fine grid at most this size
_DEFAULT_FINE_SIZE = 640



def load_model(name_or_path: str | os.PathLike = "3enl") -> gemmi.Structure:
    """Read an atomic model, keep its first model, remove hydrogens and waters.

    Args:
        name_or_path: a built-in name (``"3enl"``: yeast enolase, the model of the RELION fixtures) or the path
            of a PDB / mmCIF file (optionally gzipped).

    Returns:
        A new ``gemmi.Structure`` with exactly one model; coordinates in Å as in the file.
    """
    key = str(name_or_path)
    path = _BUILTIN.get(key.lower(), Path(key))
    if not path.is_file():
        raise InputFileError(path, "atomic model not found",
                             f"give a PDB/mmCIF file or one of the built-in names {sorted(_BUILTIN)}")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with a message
        raise InputFileError(path, f"cannot read atomic model ({' '.join(str(exc).split())})",
                             "give a valid PDB or mmCIF file") from None
    if len(st) == 0:
        raise InputFileError(path, "the file contains no model", "give a PDB/mmCIF file with coordinates")
    while len(st) > 1:
        del st[1]
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()
    st.remove_empty_chains()
    if _count_atoms(st[0]) == 0:
        raise InputFileError(path, "no non-hydrogen, non-water atoms in the model", "give a model with a macromolecule")
    return st


def _count_atoms(model: gemmi.Model) -> int:
    return sum(len(res) for chain in model for res in chain)


def _as_model(model) -> gemmi.Model:
    """A private copy of the (first) model of ``model`` (Structure, Model, name or path)."""
    if isinstance(model, gemmi.Structure):
        if len(model) == 0:
            raise CryopipeError("the gemmi.Structure has no model: load it with cryopipe.sim.atomic.load_model")
        return model[0].clone()
    if isinstance(model, gemmi.Model):
        return model.clone()
    return load_model(model)[0].clone()


def _atom_positions(model: gemmi.Model) -> np.ndarray:
    return np.array([[a.pos.x, a.pos.y, a.pos.z] for ch in model for res in ch for a in res], dtype=np.float64)


def model_radius(model) -> float:
    """Largest distance (Å) of an atom from the model's mass-weighted centre of mass."""
    m = _as_model(model)
    com = m.calculate_center_of_mass()
    xyz = _atom_positions(m)
    return float(np.sqrt(((xyz - np.array([com.x, com.y, com.z])) ** 2).sum(axis=1)).max())


def _fourier_crop_3d(volume: torch.Tensor, n: int) -> torch.Tensor:
    """Fourier-crop a real cube ``[M, M, M]`` to ``[n, n, n]`` (``n <= M``), axis by axis.

    Sample ``j`` of the result lies where sample ``j·M/n`` of the input lies (both grids start at the same
    point, so the box centre ``M//2`` maps to ``n//2`` when ``M/n`` is an integer). Frequencies ``|k| < n/2``
    are kept on every axis, the Nyquist plane of an even ``n`` is set to zero (keeps the result real and
    symmetric); values are rescaled so that the mean is preserved.
    """
    m = volume.shape[-1]
    half = n // 2
    # kept frequency indices along a full (complex) axis: 0..ceil(n/2)-1 and -(n//2 - 1)..-1 (no Nyquist)
    pos = torch.arange(0, (n + 1) // 2, device=volume.device)
    neg = torch.arange(m - (half - 1) if n % 2 == 0 else m - half, m, device=volume.device)
    keep = torch.cat([pos, neg])
    ft = torch.fft.rfft(volume, dim=-1)[..., : (n + 1) // 2]  # x: 0..ceil(n/2)-1
    ft = torch.fft.fft(ft, dim=-2).index_select(-2, keep)
    ft = torch.fft.fft(ft, dim=-3).index_select(-3, keep)
    # re-insert zero Nyquist rows so the index layout is the standard one of an n-grid
    if n % 2 == 0:
        zeros_x = torch.zeros(ft.shape[:-1] + (1,), dtype=ft.dtype, device=ft.device)
        ft = torch.cat([ft, zeros_x], dim=-1)
        def _insert(t: torch.Tensor, dim: int) -> torch.Tensor:
            a, b = t.split([half, t.shape[dim] - half], dim=dim)
            shape = list(t.shape)
            shape[dim] = 1
            return torch.cat([a, torch.zeros(shape, dtype=t.dtype, device=t.device), b], dim=dim)
        ft = _insert(_insert(ft, -2), -3)
    ft = torch.fft.ifft(ft, dim=-3)
    ft = torch.fft.ifft(ft, dim=-2)
    out = torch.fft.irfft(ft, n=n, dim=-1)
    return out * (n / m) ** 3


def potential_map(
    model,
    box: int,
    pixel_size: float,
    blur_B: float = 20.0,
    center: bool = True,
    oversample: int | None = None,
    device: str | torch.device | None = "cpu",
) -> np.ndarray:
    """Electron potential of an atomic model on an ``N³`` grid.

    Args:
        model: ``gemmi.Structure`` / ``gemmi.Model`` (not modified), a built-in name (``"3enl"``) or a file path.
            Hydrogens and waters are removed when reading a file (:func:`load_model`).
        box: ``N``, voxels per side.
        pixel_size: voxel size in Å.
        blur_B: extra B-factor (Å²) added to every atom's B (the fixtures used 20).
        center: put the mass-weighted centre of mass at voxel ``N//2`` (``(N//2)·pixel_size`` Å from voxel 0).
            With ``False`` the model coordinates are used as they are: an atom at ``(x, y, z)`` Å lies at voxel
            ``(x, y, z) / pixel_size`` (0-based; the map is periodic, so keep the model inside the box).
        oversample: evaluate on a grid this many times finer, then Fourier-crop (default: the smallest factor
            that gives a spacing ≤ 0.75 Å, i.e. 4 for 3 Å pixels as in the fixtures' ``ref_map.mrc``; lowered
            for large boxes to keep the fine grid ≤ 640³, or ≤ 1024³ with a factor of 2 or 1).
        device: where the Fourier crop runs.

    Returns:
        float32 array ``[z, y, x]``, arbitrary potential units (the fixtures' scale).
    """
    if box < 2 or pixel_size <= 0:
        raise CryopipeError(f"potential_map: box ({box}) must be >= 2 and pixel_size ({pixel_size} Å) > 0")
    if blur_B < 0:
        raise CryopipeError(f"potential_map: blur_B={blur_B} Å² must be >= 0")
    if oversample is None:
        oversample = max(1, math.ceil(pixel_size / _MAX_FINE_SPACING_A - 1e-9))
        # large boxes: fewer sub-samples (3 gives a correlation of 1 − 1e-8 with 4 on ref_map, 2 gives 0.9999)
        while oversample > 1 and box * oversample > (_DEFAULT_FINE_SIZE if oversample > 2 else _MAX_FINE_SIZE):
            oversample -= 1
    if oversample < 1:
        raise CryopipeError(f"potential_map: oversample={oversample} must be >= 1")
    m_fine = box * oversample
    if m_fine > _MAX_FINE_SIZE:
        raise CryopipeError(
            f"potential_map: the oversampled grid would be {m_fine}³ voxels (box {box} × oversample {oversample}); "
            f"use oversample <= {_MAX_FINE_SIZE // box} or a smaller box")
    spacing = pixel_size / oversample
    mdl = _as_model(model)
    if center:
        com = mdl.calculate_center_of_mass()
        target = (box // 2) * pixel_size
        mdl.transform_pos_and_adp(
            gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(target - com.x, target - com.y, target - com.z)))
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2.0 * spacing
    dc.blur = float(blur_B)
    side = m_fine * spacing
    dc.grid.unit_cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P1")
    dc.grid.set_size(m_fine, m_fine, m_fine)
    dc.add_model_density_to_grid(mdl)
    dc.grid.symmetrize_sum()  # P1: folds nothing, but applies the periodic wrap-around gemmi expects
    fine = torch.from_numpy(np.array(dc.grid, dtype=np.float32, copy=True).transpose(2, 1, 0).copy())
    del dc
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if oversample == 1:
        out = fine
    else:
        out = _fourier_crop_3d(fine.to(dev), box)
    return out.to(torch.float32).cpu().numpy()


def _generic_direction(ops: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit vector ``d`` (among 600 Fibonacci-sphere directions) whose images ``R·d`` under the group's
    non-identity operators stay farthest from ``d``: ``(d, min_R |R·d − d|)`` (``inf`` for C1)."""
    others = np.array([r for r in ops if not np.allclose(r, np.eye(3), atol=1e-6)])
    if len(others) == 0:
        return np.array([1.0, 0.0, 0.0]), math.inf
    k = np.arange(600) + 0.5
    z = 1.0 - 2.0 * k / 600
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    d = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], axis=1)
    sep = np.linalg.norm(np.einsum("rij,dj->dri", others, d) - d[:, None, :], axis=-1).min(axis=1)
    best = int(np.argmax(sep))
    return d[best], float(sep[best])


def _first_clash(xyz: np.ndarray, label: np.ndarray, clash_A: float) -> tuple[int, int] | None:
    """A pair of copy labels with atoms closer than ``clash_A`` Å, or None."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(xyz).query_pairs(clash_A, output_type="ndarray")
    bad = pairs[label[pairs[:, 0]] != label[pairs[:, 1]]]
    if len(bad) == 0:
        return None
    i, j = sorted((int(label[bad[0, 0]]), int(label[bad[0, 1]])))
    return i, j


def symmetric_assembly(model, group: str, offset_A=None, clash_A: float | None = 2.0) -> gemmi.Structure:
    """A point-group-symmetric assembly built from copies of one model.

    The model's mass-weighted centre of mass is moved to ``offset`` (Å, from the symmetry centre at the origin),
    then every operator ``R`` of ``group`` (:func:`cryopipe.core.symmetry.symmetry_operators`, RELION's axis
    conventions) makes one copy with coordinates ``R·x``. :func:`potential_map` with ``center=True`` then puts the
    symmetry centre at voxel ``N//2`` for D/T/O/I groups (for Cn the centre of mass lies on the z axis, so the
    axis passes through ``N//2`` in x and y).

    Args:
        model: Structure / Model / name / path (not modified).
        group: point group name, e.g. ``"C4"``, ``"D2"``, ``"T"``, ``"O"``, ``"I1"``.
        offset_A: ``(x, y, z)`` Å; or a number: that distance along the direction farthest from the group's
            symmetry elements (for Cn: in the xy plane); or None: the smallest such distance (5 % steps, from
            copies 1.5 model radii apart) at which no two copies clash.
        clash_A: raise if atoms of different copies come closer than this (Å); ``None`` skips the check (and
            then ``offset_A`` must be given).

    Returns:
        A new ``gemmi.Structure`` with one model; chains named ``<chain>_<copy index>`` (copy 0 = identity).
    """
    from cryopipe.core.symmetry import symmetry_operators

    ops = symmetry_operators(group).detach().cpu().to(torch.float64).numpy()
    mono = _as_model(model)
    com = mono.calculate_center_of_mass()
    com = np.array([com.x, com.y, com.z])
    xyz0 = _atom_positions(mono) - com
    label = np.repeat(np.arange(len(ops)), len(xyz0))
    direction, sep = _generic_direction(ops)

    def copies(off: np.ndarray) -> np.ndarray:
        return np.einsum("rij,aj->rai", ops, xyz0 + off).reshape(-1, 3)

    if offset_A is None:
        if clash_A is None:
            raise CryopipeError("symmetric_assembly: give offset_A when the clash check is off (clash_A=None)")
        if math.isinf(sep):
            off = np.zeros(3)
        else:
            radius = float(np.sqrt((xyz0 ** 2).sum(axis=1)).max())
            dist = 1.5 * radius / sep
            for _ in range(60):
                if _first_clash(copies(dist * direction), label, clash_A) is None:
                    break
                dist *= 1.05
            off = dist * direction
    else:
        off = np.asarray(offset_A, dtype=np.float64)
        if off.ndim == 0:
            off = float(off) * direction
        if off.shape != (3,):
            raise CryopipeError(f"symmetric_assembly: offset_A={offset_A!r} must be a number or an (x, y, z) "
                                "vector in Å")
    if clash_A is not None and len(ops) > 1:
        clash = _first_clash(copies(off), label, clash_A)
        if clash is not None:
            raise CryopipeError(
                f"symmetric_assembly: copies {clash[0]} and {clash[1]} of the model overlap (atoms closer than "
                f"{clash_A} Å) with offset {np.round(off, 1).tolist()} Å; use a larger offset_A (or None: automatic)")
    mono.transform_pos_and_adp(
        gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(off - com).tolist())))
    out = gemmi.Structure()
    out.name = f"assembly_{group}"
    out.cell = gemmi.UnitCell()  # no crystal cell: an isolated assembly
    new_model = gemmi.Model("1")
    for i, r in enumerate(ops):
        copy = mono.clone()
        copy.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33([[float(v) for v in row] for row in r]),
                                                   gemmi.Vec3(0.0, 0.0, 0.0)))
        for ch in copy:
            ch.name = f"{ch.name}_{i}"
            new_model.add_chain(ch)
    out.add_model(new_model)
    out.setup_entities()
    return out

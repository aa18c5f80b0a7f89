"""RELION tomography particle sets (``particles.star``) and optimisation sets (``optimisation_set.star``).

Import these from :mod:`cryopipe.io.tomography`, which re-exports them.

**Particles** (``src/jaz/tomography/particle_set.cpp`` behaviour, tomography.md §1.4, fixture README A2/A9): blocks
``data_general`` (key-value), ``data_optics``, ``data_particles``; any other block is kept. Coordinates are RELION 5
``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the tomogram centre ``(X/2, Y/2, Z/2)``) or, when those are absent,
RELION 4 ``rlnCoordinateX/Y/Z`` (decentred unbinned tilt-series px from the tomogram corner, read unchanged: no
+1, as RELION 5 reads them). Origins rlnOriginX/Y/ZAngst are in the subtomogram frame (0 if absent);
``A_sub = Euler(rlnTomoSubtomogramRot/Tilt/Psi)`` (identity if absent), ``A_part = Euler(rlnAngleRot/Tilt/Psi)``
(identity if absent).

Reading keeps every block and column (read → write loses nothing). Given the tomogram set, the particles are
completed as RELION 5's ``ParticleSet::read`` does: unknown rlnTomoName values are an error (listing the known
names); a missing ``data_general`` becomes ``rlnTomoSubTomosAre2DStacks 0``; a missing ``data_optics`` is built
from ``tomograms.star`` — one optics group per distinct rlnOpticsGroupName of the particles' tomograms (the tomogram
name when tomograms.star has no rlnOpticsGroupName), numbered 1, 2, … in order of first appearance among the
particles, with rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast and rlnTomoTiltSeriesPixelSize of the
first tomogram of that group — and every particle's rlnOpticsGroup is set accordingly; missing
rlnTomoParticleName values are numbered ``<TomoName>/<k>`` (k = 1, 2, … per tomogram in file order).

**Optimisation sets** list the files of a tomography data set (tomography.md §1.5); written like RELION 5 (one
unnamed key-value block). Relative paths are resolved by the rule of :func:`cryopipe.io.tomography.project_root`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.tilt_geometry import centered_angstrom, particle_positions_px, subtomogram_orientations
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.star import read_star, write_star
from cryopipe.io.tomography import RELION5_VERSION, TomogramSet, path_for_star, project_root

__all__ = ["TomoParticles", "read_tomo_particles", "write_tomo_particles", "check_inside", "to_centered_coordinates",
           "read_optimisation_set", "write_optimisation_set", "OPTIMISATION_SET_LABELS", "optimisation_set_entries",
           "is_optimisation_set", "is_tomo_particles"]

_CENTERED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
_DECENTRED = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
_ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
_SUBTOMO_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_OPTICS_FROM_TOMOGRAMS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnTomoTiltSeriesPixelSize")

#: the path entries of an optimisation set, in the order RELION lists them
OPTIMISATION_SET_LABELS = ("rlnTomoParticlesFile", "rlnTomoTomogramsFile", "rlnTomoTrajectoriesFile",
                           "rlnTomoManifoldsFile", "rlnTomoReferenceMap1File", "rlnTomoReferenceMap2File",
                           "rlnTomoReferenceMaskFile", "rlnTomoReferenceFscFile")


# ================================================================================================ particles


@dataclass
class TomoParticles:
    """A tomography particle set.

    Attributes:
        general: the ``data_general`` key-value block ({} if absent).
        optics: the ``data_optics`` table, or None.
        particles: the ``data_particles`` table (every column, file order).
        path: the file it was read from, or None.
        other_blocks: any further blocks of the file (kept for writing).
    """

    general: dict
    optics: pd.DataFrame | None
    particles: pd.DataFrame
    path: Path | None = None
    other_blocks: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def _where(self):
        return self.path if self.path is not None else "<tomography particles>"

    @property
    def tomo_names(self) -> np.ndarray:
        """rlnTomoName of every particle ``[N]`` (str)."""
        return self.particles["rlnTomoName"].astype(str).to_numpy()

    def _columns(self, labels, default: float | None) -> np.ndarray:
        """``[N, len(labels)]`` float64; absent columns are ``default`` (error if None)."""
        t = self.particles
        out = np.empty((len(t), len(labels)), dtype=np.float64)
        for j, lab in enumerate(labels):
            if lab not in t.columns:
                if default is None:
                    raise InputFileError(self._where, f"no {lab} column", f"add {lab} to data_particles")
                out[:, j] = default
                continue
            vals = pd.to_numeric(t[lab], errors="coerce").to_numpy(np.float64)
            if np.isnan(vals).any():
                i = int(np.argmax(np.isnan(vals)))
                raise InputFileError(self._where, f"non-numeric {lab} value {t[lab].tolist()[i]!r} in row {i + 1}",
                                     f"fix the {lab} column")
            out[:, j] = vals
        return out

    @property
    def has_centered_coordinates(self) -> bool:
        """True for RELION 5 rlnCenteredCoordinate*Angst columns (used when both forms are present)."""
        return all(lab in self.particles.columns for lab in _CENTERED)

    def subtomogram_matrices(self) -> np.ndarray:
        """``[N, 3, 3]`` A_sub = Euler(rlnTomoSubtomogramRot/Tilt/Psi) (identity if the columns are absent)."""
        a = self._columns(_SUBTOMO_ANGLES, 0.0)
        return euler_to_matrix(*(a[:, j] for j in range(3))).numpy() if len(a) else np.zeros((0, 3, 3))

    def orientations(self) -> np.ndarray:
        """``[N, 3, 3]`` full orientation A = A_sub·Euler(rlnAngleRot/Tilt/Psi) (reference → tomogram frame)."""
        if not len(self):
            return np.zeros((0, 3, 3))
        return subtomogram_orientations(self._columns(_SUBTOMO_ANGLES, 0.0), self._columns(_ANGLES, 0.0)).numpy()

    def positions_px(self, tomograms: TomogramSet) -> np.ndarray:
        """``[N, 3]`` particle centres in decentred unbinned tilt-series px, origins applied in the subtomogram frame
        (``p = coordinate − A_sub·origin/px``, fixture README A2; px = the tomogram's rlnTomoTiltSeriesPixelSize)."""
        names = self.tomo_names
        centered = self.has_centered_coordinates
        coords = self._columns(_CENTERED if centered else _DECENTRED, None)
        origins = self._columns(_ORIGINS, 0.0)
        A_sub = self.subtomogram_matrices()
        out = np.empty((len(names), 3), dtype=np.float64)
        for name in dict.fromkeys(names.tolist()):
            ts = tomograms[name]
            rows = names == name
            c = coords[rows] if centered else centered_angstrom(coords[rows], ts.pixel_size, ts.tomogram_size)
            out[rows] = particle_positions_px(c, origins[rows], A_sub[rows], ts.pixel_size, ts.tomogram_size).numpy()
        return out

    def copy(self) -> TomoParticles:
        return TomoParticles(dict(self.general), None if self.optics is None else self.optics.copy(),
                             self.particles.copy(), self.path, dict(self.other_blocks))


def _general_block(block, where) -> dict:
    if block is None:
        return {}
    if isinstance(block, dict):
        return dict(block)
    if len(block) != 1:
        raise InputFileError(where, f"data_general has {len(block)} rows", "give one key-value list")
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in block.iloc[0].items()}


def _particle_block_name(blocks: dict, where) -> str:
    loops = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame)]
    for name in ("particles", ""):
        if name in loops:
            return name
    rest = [k for k in loops if k not in ("optics", "general")]
    if len(rest) == 1:
        return rest[0]
    raise InputFileError(where, f"no data_particles table (tables: {', '.join('data_' + k for k in loops) or 'none'})",
                         "give a RELION tomography particles file")


def _check_names(particles: TomoParticles, tomograms: TomogramSet) -> None:
    unknown = [n for n in dict.fromkeys(particles.tomo_names.tolist()) if n not in tomograms]
    if unknown:
        i = int(np.argmax(particles.tomo_names == unknown[0]))
        raise InputFileError(particles._where, f"particle {i + 1} names tomogram {unknown[0]!r} (rlnTomoName), which "
                                               f"is not in {tomograms.path or 'the tomogram set'} (known: "
                                               f"{', '.join(tomograms.names) or 'none'})",
                             "use the tomograms.star the particles belong to")


def _optics_from_tomograms(particles: TomoParticles, tomograms: TomogramSet) -> tuple[pd.DataFrame, np.ndarray]:
    """RELION's optics table for particles without one, and every particle's group number (see module doc)."""
    group_of_tomo = {ts.name: str(ts.globals.get("rlnOpticsGroupName", ts.name)) for ts in tomograms}
    group_names = [group_of_tomo[n] for n in particles.tomo_names.tolist()]
    order = list(dict.fromkeys(group_names))
    rows = []
    for number, group in enumerate(order, start=1):
        first = tomograms[particles.tomo_names[group_names.index(group)]]
        missing = [lab for lab in _OPTICS_FROM_TOMOGRAMS if lab not in first.globals]
        if missing:
            raise InputFileError(tomograms.path or "tomograms", f"tomogram {first.name} has no {missing[0]}",
                                 "the optics of the particles are taken from tomograms.star: add it there")
        rows.append({**{lab: float(first.globals[lab]) for lab in _OPTICS_FROM_TOMOGRAMS},
                     "rlnOpticsGroup": number, "rlnOpticsGroupName": group})
    numbers = np.array([order.index(g) + 1 for g in group_names], dtype=np.int64)
    return pd.DataFrame(rows), numbers


def _complete_as_relion(particles: TomoParticles, tomograms: TomogramSet) -> None:
    """Fill in what RELION 5's ParticleSet::read adds (in place; see module doc)."""
    _check_names(particles, tomograms)
    if not particles.general:
        particles.general = {"rlnTomoSubTomosAre2DStacks": 0}
    if particles.optics is None:
        particles.optics, numbers = _optics_from_tomograms(particles, tomograms)
        particles.particles["rlnOpticsGroup"] = numbers
    elif "rlnTomoTiltSeriesPixelSize" not in particles.optics.columns:
        raise InputFileError(particles._where, "data_optics has no rlnTomoTiltSeriesPixelSize column",
                             "RELION requires it: add the tilt-series pixel size to every optics group")
    if "rlnTomoParticleName" not in particles.particles.columns:
        names = pd.Series(particles.tomo_names)
        k = names.groupby(names).cumcount() + 1
        particles.particles["rlnTomoParticleName"] = (names + "/" + k.astype(str)).to_numpy()


def read_tomo_particles(path: str | os.PathLike, tomograms: TomogramSet | None = None) -> TomoParticles:
    """Read a tomography particles STAR file (RELION 4 or 5). With ``tomograms``, check the rlnTomoName values and
    complete the set as RELION does (general block, optics table from tomograms.star, particle names: module doc).
    """
    path = Path(path)
    blocks = read_star(path)
    name = _particle_block_name(blocks, path)
    table = blocks[name].copy()
    if "rlnTomoName" not in table.columns:
        raise InputFileError(path, "no rlnTomoName column", "a tomography particles file names each particle's "
                                                            "tomogram (rlnTomoName)")
    if not (all(lab in table.columns for lab in _CENTERED) or all(lab in table.columns for lab in _DECENTRED)):
        raise InputFileError(path, "no particle coordinates (rlnCenteredCoordinateX/Y/ZAngst or RELION 4 "
                                   "rlnCoordinateX/Y/Z)", "give a tomography particles file with 3D coordinates")
    optics = blocks.get("optics")
    particles = TomoParticles(_general_block(blocks.get("general"), path),
                              optics.copy() if isinstance(optics, pd.DataFrame) else None, table, path,
                              {k: v for k, v in blocks.items() if k not in (name, "general", "optics")})
    if tomograms is not None:
        _complete_as_relion(particles, tomograms)
    return particles


def write_tomo_particles(path: str | os.PathLike, particles: TomoParticles) -> None:
    """Write ``data_general`` (if any), ``data_optics`` (if any), ``data_particles`` and any other kept blocks, with
    RELION 5 ``# version 50001`` headers. Columns are written as they are (RELION 4 rlnCoordinateX/Y/Z too: convert
    with :func:`to_centered_coordinates` first for a pure RELION 5 file)."""
    blocks: dict = {}
    if particles.general:
        blocks["general"] = particles.general
    if particles.optics is not None:
        blocks["optics"] = particles.optics.reset_index(drop=True)
    blocks["particles"] = particles.particles.reset_index(drop=True)
    blocks.update(particles.other_blocks)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_star(Path(path), blocks, version=RELION5_VERSION)


def to_centered_coordinates(particles: TomoParticles, tomograms: TomogramSet) -> TomoParticles:
    """A copy whose RELION 4 rlnCoordinateX/Y/Z are replaced (same column position) by RELION 5
    rlnCenteredCoordinateX/Y/ZAngst = (coordinate − size/2)·px; positions are unchanged. Files that already have
    centred coordinates only lose the RELION 4 columns (as RELION 5 writes them)."""
    out = particles.copy()
    t = out.particles
    if not particles.has_centered_coordinates:
        names = particles.tomo_names
        coords = particles._columns(_DECENTRED, None)
        centered = np.empty_like(coords)
        for name in dict.fromkeys(names.tolist()):
            ts = tomograms[name]
            rows = names == name
            centered[rows] = centered_angstrom(coords[rows], ts.pixel_size, ts.tomogram_size).numpy()
        at = list(t.columns).index(_DECENTRED[0])
        for j, lab in enumerate(_CENTERED):
            t.insert(at + j, lab, centered[:, j])
    out.particles = t.drop(columns=[lab for lab in _DECENTRED if lab in t.columns])
    return out


def check_inside(particles: TomoParticles, tomograms: TomogramSet) -> None:
    """Raise a one-line InputFileError naming the first particle whose centre (:meth:`TomoParticles.positions_px`)
    lies outside its tomogram, i.e. outside ``[−0.5, size − 0.5)`` px on some axis (the extent of the voxels
    0 … size−1 of rlnTomoSizeX/Y/Z)."""
    pos = particles.positions_px(tomograms)
    names = particles.tomo_names
    sizes = np.array([tomograms[n].tomogram_size for n in names.tolist()], dtype=np.float64).reshape(-1, 3)
    outside = ((pos < -0.5) | (pos >= sizes - 0.5)).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        label = (str(particles.particles["rlnTomoParticleName"].iloc[i])
                 if "rlnTomoParticleName" in particles.particles.columns else f"{i + 1} (row)")
        x, y, z = pos[i]
        X, Y, Z = sizes[i].astype(int)
        raise InputFileError(particles._where, f"particle {label} lies outside tomogram {names[i]}: position "
                                               f"({x:.1f}, {y:.1f}, {z:.1f}) px, tomogram {X}x{Y}x{Z} px",
                             "check its coordinates and origins, or rlnTomoSizeX/Y/Z in tomograms.star")


# ================================================================================================ optimisation set


def _head_contains(path: str | os.PathLike, label: bytes) -> bool:
    """True if the first 64 kB of ``path`` contain ``label`` (a large STAR file is not parsed twice); False for an
    unreadable path."""
    try:
        with open(path, "rb") as f:
            return label in f.read(65536)
    except OSError:
        return False


def is_optimisation_set(path: str | os.PathLike) -> bool:
    """True if ``path`` is a STAR file with a ``rlnTomoParticlesFile`` entry (a RELION optimisation set)."""
    return _head_contains(path, b"_rlnTomoParticlesFile")


def is_tomo_particles(path: str | os.PathLike) -> bool:
    """True if ``path`` is a tomography particles STAR file (a ``rlnTomoName`` column in its first 64 kB)."""
    return _head_contains(path, b"_rlnTomoName")


def optimisation_set_entries(path: str | os.PathLike) -> dict[str, str]:
    """The file entries of an optimisation set as written in it (every ``rln…File`` label → its text, unresolved),
    from a key-value block (RELION 5 writes one) or a one-row table (as in the RELION fixture's
    ``optimisation_set.star``); raises InputFileError when there are none."""
    path = Path(path)
    for block in read_star(path).values():
        if isinstance(block, pd.DataFrame):
            if len(block) != 1:
                continue
            block = {k: v for k, v in block.iloc[0].items()}
        entries = {str(k): str(v) for k, v in block.items() if str(k).endswith("File")}
        if entries:
            return entries
    raise InputFileError(path, "no optimisation-set entries (rlnTomoParticlesFile, rlnTomoTomogramsFile, …)",
                         "give a RELION optimisation_set.star")


def read_optimisation_set(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The file entries of an optimisation set (:func:`optimisation_set_entries`) → resolved paths (``root`` or the
    rule of :func:`cryopipe.io.tomography.project_root`). Files are not required to exist (a missing one resolves
    to its working-directory path)."""
    path = Path(path)
    return {k: Path(v) if Path(v).is_absolute() else project_root(v, path, root) / v
            for k, v in optimisation_set_entries(path).items()}


def write_optimisation_set(path: str | os.PathLike, entries: dict[str, str | os.PathLike]) -> None:
    """Write an optimisation set as RELION 5 does (one unnamed key-value block, ``# version 50001``): the known
    labels (:data:`OPTIMISATION_SET_LABELS`) first in RELION's order, then any other. ``Path`` values are written
    relative to the working directory (the project directory) when below it, strings as given."""
    unknown = [k for k in entries if not (str(k).startswith("rln") and str(k).endswith("File"))]
    if unknown:
        raise CryopipeError(f"write_optimisation_set: {unknown[0]!r} is not an optimisation-set label "
                            f"(expected one of {', '.join(OPTIMISATION_SET_LABELS)})")
    ordered = [k for k in OPTIMISATION_SET_LABELS if k in entries] + \
              [k for k in entries if k not in OPTIMISATION_SET_LABELS]
    block = {k: path_for_star(entries[k]) if isinstance(entries[k], Path) else str(entries[k]) for k in ordered}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_star(Path(path), {"": block}, version=RELION5_VERSION)

"""Single-particle data sets in multi-particle refinement: a particle stack as a "tilt series" of one tilt per
particle, so that the forward model, optimiser and reconstruction of :mod:`cryopipe.mpr` refine it unchanged.

Mapping (``N`` particles of an ``S × S`` stack, RELION 3.1 particles STAR):

* extracted particles have light protein: the model is ``+CTF`` (``flip_contrast=False``), as RELION's;
* tilt ``n`` = image ``n`` (``images [N, S, S]``), stage angles 0, no tilt shift, no dose (pre-exposure 0: dose
  weight 1), no image warp; the only pair of particle ``n`` is ``(n, n)``;
* the particle's centre: ``(S//2, S//2) − origin/px`` (rlnOriginX/YAngst), held as the position
  ``(S//2 − ox, S//2 − oy, 0)`` in a "tomogram" of ``(S, S, 1)`` px with no defocus slope (so the z position has
  no effect); the pose group refines rotation vectors (deg) and x/y shifts (Å) of it;
* per-"tilt" CTF groups are per-particle: ``defocus`` the mean defocus (M's / RELION's per-particle defocus),
  ``ctf`` defocus and astigmatism; ``beamtilt`` one (x, y) beam tilt per optics group (rlnBeamTiltX/Y, mrad;
  RELION keeps beam tilt in the optics table).

* ``magnification``, ``oddzernike`` (beam tilt + trefoil), ``evenzernike`` (4th order): one value for the data
  set's single optics group (refused with several), read from and written to the optics table as RELION keeps them
  (rlnMagMat00..11, rlnOddZernike, rlnEvenZernike; the beam tilt stays in rlnBeamTiltX/Y, which RELION adds to
  rlnOddZernike when it reads them); the magnification changes the frequencies only (``M·k``), not the extracted
  particles' centres, as RELION's ``ObservationModel``.

Groups ``shifts``, ``imagewarp``, ``stageangles`` and ``temporalposes`` have no meaning here and are refused. The CTF B-factor
(rlnCtfBfactor) is not modelled; a non-zero rlnPhaseShift is refused (phase plates are not modelled). All
particle images are held in memory (float32, ``4·N·S²`` bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import ImageReader
from cryopipe.io.particles import ParticleData, ctf_parameters, euler_angles, optics_values, origins_px, pixel_sizes
from cryopipe.mpr.driver import (MAG_LABELS, MprOptions, MprResult, check_stages, format_vector, optics_row_metadata,
                                 padded_weighted_mean, refine_data_sets, start_run)
from cryopipe.mpr.forward import TiltSeriesData

__all__ = ["SPA_GROUPS", "SPA_NAME", "check_spa_stages", "prepare_particles", "run_mpr_spa", "updated_spa_particles",
           "particle_subset", "joined_subsets", "shared_beam_tilt", "shared_optics", "spa_optics_metadata"]

#: parameter groups that apply to single-particle data
SPA_GROUPS = ("poses", "defocus", "ctf", "beamtilt", "magnification", "oddzernike", "evenzernike")
#: SPA groups with one value per data set, refined for a data set of one optics group only
OPTICS_GROUPS = ("magnification", "oddzernike", "evenzernike")
#: the name of the one data set in :attr:`MprResult.data`
SPA_NAME = "particles"


def _one_value(values: np.ndarray, label: str, where) -> float:
    if np.ptp(values) > 1e-6 * max(1.0, float(np.abs(values).max())):
        raise InputFileError(where, f"{label} differs between optics groups ({values.min():g} … {values.max():g})",
                             "refine optics groups of one pixel size, voltage and Cs separately")
    return float(values[0])


def prepare_particles(particles: ParticleData, box: int, binning: float, root_dir: str | Path = ".",
                      device=None, beam_tilt_per_micrograph: bool = False, load_images: bool = True
                      ) -> tuple[TiltSeriesData, np.ndarray]:
    """``(data, beam-tilt group ids [G])``: the particles as one :class:`TiltSeriesData` (module docstring) with its
    images loaded (``load_images``; else a zero-memory stand-in, :func:`particle_images` reads them), and the id of
    each beam-tilt group: the rlnOpticsGroup values, or with ``beam_tilt_per_micrograph`` the rlnMicrographName
    values (one beam tilt per micrograph, starting from its optics group's). ``box`` (map px) × ``binning`` (map
    pixel / image pixel) must fit the particle images."""
    where = particles.path if particles.path is not None else "<particles>"
    t = particles.particles
    n = len(t)
    if n == 0:
        raise InputFileError(where, "has no particles", "give a particles STAR with rows")
    if "rlnImageName" not in t.columns:
        raise InputFileError(where, "no rlnImageName column", "give extracted particles (image stacks)")
    px = _one_value(pixel_sizes(particles), "rlnImagePixelSize", where)
    ctf = ctf_parameters(particles)
    voltage = _one_value(ctf["voltage"], "rlnVoltage", where)
    cs = _one_value(ctf["cs"], "rlnSphericalAberration", where)
    q0 = _one_value(ctf["amplitude_contrast"], "rlnAmplitudeContrast", where)
    if np.abs(ctf["phase_shift"]).max() > 0:
        raise InputFileError(where, "non-zero rlnPhaseShift", "phase-plate data are not modelled by cryopipe mpr")
    reader = ImageReader(t["rlnImageName"].to_numpy(), root_dir)
    H, W = reader.image_shape
    s0 = int(binning * box + 0.5)
    if H != W or s0 > W:
        raise InputFileError(where, f"particle images are {W}×{H} px, the half-maps need {s0}×{s0}",
                             "give square particle images at least as large as the half-maps' box")

    def tt(x):
        return torch.as_tensor(np.array(x, dtype=np.float64), device=device)

    images = torch.from_numpy(reader.read(np.arange(n))).to(device) if load_images else \
        torch.zeros(1, 1, 1, device=device).expand(n, H, W)
    origins = origins_px(particles)[:, :2]
    positions = np.stack([W // 2 - origins[:, 0], H // 2 - origins[:, 1], np.zeros(n)], 1)
    ang = euler_angles(particles)
    orientations = euler_to_matrix(tt(ang[:, 0]), tt(ang[:, 1]), tt(ang[:, 2]))
    if "rlnRandomSubset" in t.columns:
        halves = pd.to_numeric(t["rlnRandomSubset"], errors="coerce").to_numpy()
        if not np.isin(halves, (1, 2)).all():
            raise InputFileError(where, "rlnRandomSubset values other than 1 and 2", "give each particle 1 or 2")
    else:
        halves = np.arange(n) % 2 + 1  # M: alternating when absent
    groups = pd.to_numeric(t["rlnOpticsGroup"], errors="coerce").to_numpy() if "rlnOpticsGroup" in t.columns \
        else np.ones(n)
    if beam_tilt_per_micrograph:
        if "rlnMicrographName" not in t.columns:
            raise InputFileError(where, "no rlnMicrographName column", "give the particles' micrographs, or refine "
                                 "one beam tilt per optics group (leave out --beamtilt_per_micrograph)")
        groups = t["rlnMicrographName"].astype(str).to_numpy()
    ids, beam_group = np.unique(groups, return_inverse=True)
    btx, bty = optics_values(particles, "rlnBeamTiltX", 0.0), optics_values(particles, "rlnBeamTiltY", 0.0)
    if beam_tilt_per_micrograph and {"rlnBeamTiltX", "rlnBeamTiltY"} <= set(t.columns):  # refined before
        btx, bty = (pd.to_numeric(t[lab], errors="coerce").to_numpy(float) for lab in ("rlnBeamTiltX", "rlnBeamTiltY"))
    first = np.array([np.flatnonzero(beam_group == g)[0] for g in range(len(ids))])
    beam_tilt = np.stack([btx[first], bty[first]], 1)
    defocus = np.stack([ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle"]], 1)
    data = TiltSeriesData(
        images=images, angles=tt(np.zeros((n, 3))), shifts=tt(np.zeros((n, 2))), defocus=tt(defocus),
        pre_exposure=tt(np.zeros(n)), ctf_scale=tt(ctf["scale"]),
        warp=torch.zeros(n, 2, 1, 1, dtype=torch.float64, device=device), positions=tt(positions),
        orientations=orientations, half_sets=torch.as_tensor(np.array(halves, dtype=np.int64), device=device),
        pairs=torch.arange(n, device=device)[:, None].expand(n, 2).contiguous(), pixel_size=px,
        tomogram_size=(W, H, 1), hand=1.0, defocus_slope=0.0, voltage=voltage, cs=cs, amplitude_contrast=q0,
        beam_tilt=tt(beam_tilt), beam_group=torch.as_tensor(beam_group, device=device).long(), flip_contrast=False,
        magnify_positions=False, **spa_optics_metadata(particles, device))
    return data, ids


def spa_optics_metadata(particles: ParticleData, device=None) -> dict:
    """``mag_matrix`` / ``odd_zernike`` / ``even_zernike`` from the optics table when the particles use one optics
    group (rlnMagMat00..11, rlnOddZernike, rlnEvenZernike; absent: None). With several optics groups they are not
    read (one value per data set is modelled)."""
    where = str(particles.path if particles.path is not None else "<particles>")
    t = particles.particles
    used = np.unique(pd.to_numeric(t["rlnOpticsGroup"], errors="coerce")) if "rlnOpticsGroup" in t.columns \
        else np.array([1.0])
    o = particles.optics
    if len(used) != 1 or o is None or "rlnOpticsGroup" not in o.columns:
        return {}
    row = o[pd.to_numeric(o["rlnOpticsGroup"], errors="coerce") == used[0]]
    if len(row) != 1:
        return {}
    return optics_row_metadata(row.iloc[0], f"{where} optics table", device)


def check_spa_stages(stages) -> None:
    """:func:`~cryopipe.mpr.driver.check_stages`, and a one-line error for a tilt-series-only group."""
    check_stages(stages)
    for st in stages:
        bad = [g for g in st.groups if g not in SPA_GROUPS]
        if bad:
            raise CryopipeError(f"--stage {','.join(st.groups)}: group {bad[0]} applies to tilt series only; for "
                                f"single particles use {', '.join(SPA_GROUPS)}")


def run_mpr_spa(particles: ParticleData, half1: torch.Tensor, half2: torch.Tensor, map_pixel_size: float,
                mask: torch.Tensor | None, diameter_A: float, options: MprOptions, root_dir: str | Path = ".",
                device=None, log: Callable[[str], None] = print, beam_tilt_per_micrograph: bool = False,
                images_per_set: int = 4096) -> MprResult:
    """Refine single particles (``particles``: RELION 3.1 model with rlnImageName, CTF, optics) against the
    half-maps (``[b³]``, pixel ``map_pixel_size`` Å); stages of :data:`SPA_GROUPS`. ``result.data[SPA_NAME]`` holds
    the refined metadata (:func:`updated_spa_particles` writes it back). Images are read from disk per set of
    ``images_per_set`` particles (<= 0: one set), one set in memory at a time; the beam tilt (per optics group, or
    per micrograph with ``beam_tilt_per_micrograph``) is shared by the sets (:func:`shared_beam_tilt`)."""
    check_spa_stages(options.stages)
    optics = [g for st in options.stages if st.iterations > 0 for g in st.groups if g in OPTICS_GROUPS]
    n_optics = particles.particles["rlnOpticsGroup"].nunique() if "rlnOpticsGroup" in particles.particles.columns \
        else 1
    if optics and n_optics > 1:
        raise CryopipeError(f"--stage ...{optics[0]}: refined as one value per data set, but the particles use "
                            f"{n_optics} optics groups; refine each optics group's particles separately")
    run = start_run(half1, half2, mask, map_pixel_size, diameter_A, options, device, log)
    box = run.box
    px = float(pixel_sizes(particles)[0])
    binning = map_pixel_size / px
    if binning < 1 - 1e-4:
        raise CryopipeError(f"half-map pixel {map_pixel_size} Å is smaller than the particles' {px} Å; give "
                            "half-maps at the particles' pixel size or binned")
    data, _ = prepare_particles(particles, box, binning, root_dir, device, beam_tilt_per_micrograph,
                                load_images=False)
    reader = ImageReader(particles.particles["rlnImageName"].to_numpy(), root_dir)
    size = max(1, int(images_per_set)) if images_per_set and images_per_set > 0 else len(data.pairs)
    sets = {f"{SPA_NAME}_{i // size:05d}": np.arange(i, min(i + size, len(data.pairs)))
            for i in range(0, len(data.pairs), size)}
    per = "micrographs" if beam_tilt_per_micrograph else "optics groups"
    run.say(f"{len(data.pairs)} particles (single-particle images, read from disk in {len(sets)} set(s) of up to "
            f"{size}), {data.n_beam_groups} beam-tilt group(s) ({per}), box {box}, {map_pixel_size:.3f} Å/px, "
            f"refinement limit {run.resolution:.2f} Å")
    datas = {name: particle_subset(data, rows) for name, rows in sets.items()}

    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(reader.read(sets[name])).to(data.positions.device)

    result = refine_data_sets(datas, load, run, map_pixel_size, binning, options, sync=shared_optics)
    result.data = {SPA_NAME: joined_subsets(data, [result.data[name] for name in sets])}
    return result


def particle_subset(data: TiltSeriesData, rows: np.ndarray) -> TiltSeriesData:
    """The particles ``rows`` of a single-particle data set (one "tilt" per particle) as a data set of their own
    (images a zero-memory stand-in; the beam-tilt groups and their values kept whole)."""
    idx = torch.as_tensor(rows, device=data.positions.device, dtype=torch.long)
    H, W = data.images.shape[1:]
    k = len(rows)
    return replace(data, images=torch.zeros(1, 1, 1, device=idx.device).expand(k, H, W), angles=data.angles[idx],
                   shifts=data.shifts[idx], defocus=data.defocus[idx], pre_exposure=data.pre_exposure[idx],
                   ctf_scale=data.ctf_scale[idx], warp=data.warp[idx], positions=data.positions[idx],
                   orientations=data.orientations[idx], half_sets=data.half_sets[idx],
                   pairs=torch.arange(k, device=idx.device)[:, None].expand(k, 2).contiguous(),
                   beam_group=None if data.beam_group is None else data.beam_group[idx])


def joined_subsets(data: TiltSeriesData, parts: list[TiltSeriesData]) -> TiltSeriesData:
    """Inverse of :func:`particle_subset` over consecutive subsets: ``data`` with the subsets' refined values."""
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    n = sum(len(p.pairs) for p in parts)
    return replace(data, angles=cat("angles"), shifts=cat("shifts"), defocus=cat("defocus"), warp=cat("warp"),
                   positions=cat("positions"), orientations=cat("orientations"), beam_tilt=parts[0].beam_tilt,
                   mag_matrix=parts[0].mag_matrix, odd_zernike=parts[0].odd_zernike,
                   even_zernike=parts[0].even_zernike,
                   images=torch.zeros(1, 1, 1, device=data.positions.device).expand(n, *data.images.shape[1:]))


def shared_beam_tilt(datas: dict[str, TiltSeriesData]) -> None:
    """After a sub-iteration over the particle sets (each refined its own copy of every beam-tilt group's value):
    one value per group again, the mean over the sets weighted by how many of the group's particles each holds."""
    parts = [d for d in datas.values() if d.beam_tilt is not None]
    if len(parts) < 2:
        return
    G = parts[0].beam_tilt.shape[0]
    counts = torch.stack([torch.bincount(d.beam_group, minlength=G).to(d.beam_tilt.dtype) for d in parts])  # [S, G]
    values = torch.stack([d.beam_tilt for d in parts])  # [S, G, 2]
    mean = (values * counts[..., None]).sum(0) / counts.sum(0).clamp(min=1)[:, None]
    mean = torch.where(counts.sum(0)[:, None] > 0, mean, values[0])
    for name, d in datas.items():
        if d.beam_tilt is not None:
            datas[name] = replace(d, beam_tilt=mean.clone())


def shared_optics(datas: dict[str, TiltSeriesData]) -> None:
    """:func:`shared_beam_tilt`, and one magnification matrix and odd / even Zernike vector again for all particle
    sets (each refined its own copy): their mean weighted by the sets' particle counts."""
    shared_beam_tilt(datas)
    for name in ("mag_matrix", "odd_zernike", "even_zernike"):
        parts = [d for d in datas.values() if getattr(d, name) is not None]
        if len(parts) < 2:
            continue
        mean = padded_weighted_mean([getattr(d, name) for d in parts], [float(len(d.pairs)) for d in parts])
        for key, d in datas.items():
            if getattr(d, name) is not None:
                datas[key] = replace(d, **{name: mean.clone()})


def updated_spa_particles(particles: ParticleData, data: TiltSeriesData, optics_ids: np.ndarray | None = None,
                          beam_tilt_per_micrograph: bool = False) -> ParticleData:
    """A copy of ``particles`` with the refined rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, rlnDefocusU/V/Angle (per
    particle) and rlnBeamTiltX/Y (optics table, per optics group ``optics_ids`` [G]; default: the sorted unique
    rlnOpticsGroup values, as :func:`prepare_particles` numbers them). With ``beam_tilt_per_micrograph`` the beam
    tilt goes into per-particle rlnBeamTiltX/Y columns instead (each particle its micrograph's value, as RELION
    3.0 kept beam tilt per particle; the optics table is left as it was). A refined (or given) magnification matrix
    and Zernike vectors go into the optics table (:func:`_write_optics_aberrations`)."""
    out = particles.copy()
    t = out.particles
    W, H = data.image_size
    pos = data.positions.cpu().numpy()
    px = data.pixel_size
    t["rlnOriginXAngst"] = (W // 2 - pos[:, 0]) * px
    t["rlnOriginYAngst"] = (H // 2 - pos[:, 1]) * px
    ang = matrix_to_euler(data.orientations.cpu()).numpy().reshape(-1, 3)
    for j, lab in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        t[lab] = ang[:, j]
    d = data.defocus.cpu().numpy()
    for j, lab in enumerate(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")):
        t[lab] = d[:, j]
    if data.beam_tilt is not None and beam_tilt_per_micrograph:
        bt = data.beam_tilt.cpu().numpy()[data.beam_group.cpu().numpy()]
        t["rlnBeamTiltX"], t["rlnBeamTiltY"] = bt[:, 0], bt[:, 1]
    _write_optics_aberrations(out, data)
    if data.beam_tilt is not None and not beam_tilt_per_micrograph:
        if optics_ids is None:
            groups = pd.to_numeric(t["rlnOpticsGroup"], errors="coerce").to_numpy() \
                if "rlnOpticsGroup" in t.columns else np.ones(len(t))
            optics_ids = np.unique(groups)
        bt = data.beam_tilt.cpu().numpy()
        o = out.optics
        rows = pd.Series(np.arange(len(optics_ids)), index=np.asarray(optics_ids))
        g = rows.reindex(pd.to_numeric(o["rlnOpticsGroup"], errors="coerce").to_numpy()).to_numpy()
        for j, lab in enumerate(("rlnBeamTiltX", "rlnBeamTiltY")):
            old = o[lab].to_numpy(float) if lab in o.columns else np.zeros(len(o))
            o[lab] = np.where(np.isnan(g), old, bt[np.nan_to_num(g).astype(int), j])
    return out


def _write_optics_aberrations(particles: ParticleData, data: TiltSeriesData) -> None:
    """The data set's magnification matrix and odd / even Zernike vectors into the optics-table rows of the optics
    group the particles use (rlnMagMat00..11, rlnOddZernike, rlnEvenZernike; only those the data carry; other rows
    keep theirs, or get the identity / zeros in a new column). One value per data set: :func:`run_mpr_spa` refuses
    these groups for particles of several optics groups."""
    o, t = particles.optics, particles.particles
    if o is None or "rlnOpticsGroup" not in o.columns:
        return
    groups = pd.to_numeric(o["rlnOpticsGroup"], errors="coerce").to_numpy()
    used = np.isin(groups, pd.to_numeric(t["rlnOpticsGroup"], errors="coerce").to_numpy()) \
        if "rlnOpticsGroup" in t.columns else np.ones(len(o), bool)
    if data.mag_matrix is not None:
        for lab, v in zip(MAG_LABELS, data.mag_matrix.reshape(-1).tolist()):
            old = o[lab].to_numpy(float) if lab in o.columns else \
                np.full(len(o), 1.0 if lab in ("rlnMagMat00", "rlnMagMat11") else 0.0)
            o[lab] = np.where(used, v, old)
    for lab, values in (("rlnOddZernike", data.odd_zernike), ("rlnEvenZernike", data.even_zernike)):
        if values is not None:
            old = o[lab].astype(str).to_numpy() if lab in o.columns else np.full(len(o), format_vector([0.0]))
            o[lab] = np.where(used, format_vector(values.tolist()), old)

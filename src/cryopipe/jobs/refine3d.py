"""``cryopipe refine3d``: gold-standard 3D auto-refinement (like ``relion_refine --auto_refine
--split_random_halves``).

Usage mirrors RELION::

    cryopipe refine3d --i Select/job010/particles.star --o Refine3D/job011/run --ref InitialModel/job009/initial_model.mrc \\
        --firstiter_cc --ini_high 50 --ctf --particle_diameter 200 --flatten_solvent --zero_mask --oversampling 1 \\
        --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym C1 \\
        --low_resol_join_halves 40 --norm --scale

``--i`` is a particles STAR file or a RELION optimisation set (``--ios`` is the same option; a key-value STAR
block with ``rlnTomoParticlesFile``, ``rlnTomoReferenceMap1File`` …): its particles are refined and an updated
``<prefix>_optimisation_set.star`` points at the new ``run_data.star`` and half maps.

Tomographic particles (a particles file with rlnTomoName, given by ``--ios optimisation_set.star`` or ``--i
particles.star --tomograms tomograms.star``): 3D pseudo-subtomograms from ``subtomo`` are refined on the same
engine (:class:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`: reference rotated in 3D, CTF² weights and
multiplicity, 3D offsets); ``run_data.star`` keeps RELION's tomography layout (general/optics/particles blocks,
rlnOriginX/Y/ZAngst) and ``run_optimisation_set.star`` names it, the tomograms and the half maps. 2D stacks
(rlnTomoSubTomosAre2DStacks 1) are refined on :class:`cryopipe.engine.tomo_optimiser.StackOptimiser3D` (CTFs from
the tomograms). ``--continue`` resumes a tomographic run from its ``_itNNN_optimiser.star`` (the last
``_data.star``, half models and sampling state; ``--sigma_tilt`` / ``--sigma_psi`` are not stored: give them
again).

Half-sets: ``rlnRandomSubset`` (1/2) of the input where present, random balanced halves otherwise. Start angles and
origins (Å → pixels) come from the input where present. Every iteration writes (atomically) RELION-named files
``<prefix>_itNNN_half{1,2}_model.star``, ``_half{1,2}_classKKK.mrc``, ``_data.star``, ``_optimiser.star`` and
``_sampling.star`` (iteration 0: the initial references) and logs one line. Once the run has converged the final
iteration joins the halves and uses all frequencies; it writes ``<prefix>_model.star``, ``_half{1,2}_model.star``,
``_data.star``, ``_optimiser.star``, ``_sampling.star``, ``_class001.mrc`` (joined map) and
``_half{1,2}_class001_unfil.mrc`` (unregularised half maps, for post-processing). If ``--iter`` iterations pass
without convergence, the last of them is made the final (joined) one, with a warning.

``--continue <prefix>_itNNN_optimiser.star`` rebuilds the settings, the auto-sampling state (HEALPix order,
offsets, local-search σ, counters, best resolution, smallest changes, convergence flags), the model (half maps,
spectra, noise) and the particle assignments from the files and goes on; with the same seed the continued run
repeats the uninterrupted one. Options given on the command line override the stored ones.

Files use RELION's units: Å for offsets, resolutions (rlnCurrentResolution), accuracies; 1/Å for
rlnBestResolutionThusFar (as RELION); degrees for angles. The algorithm is
:class:`cryopipe.engine.optimiser3d.Optimiser3D`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, job_backend
from cryopipe.engine.optimiser3d import (
    AutoSampling,
    Model3D,
    Optimiser3D,
    ParticleState3D,
    Refine3DSettings,
)
from cryopipe.engine.orientations3d import direction_histogram, nearest_directions
from cryopipe.engine.relion_files import (
    read_model_star,
    read_optimiser_star,
    read_sampling_star,
    resolve_relion_path,
    write_model_star_3d,
    write_optimiser_star,
    write_sampling_star_3d,
)
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.particles import ParticleData, euler_angles, write_particles
from cryopipe.io.star import read_star, write_star
from cryopipe.jobs.class2d import _argv_of, _rel, load_particles, split_output_prefix

HELP = "3D auto-refinement with gold-standard half-sets (like relion_refine --auto_refine --split_random_halves)"

__all__ = ["HELP", "Refine3DResult", "refine_3d", "is_optimisation_set", "read_optimisation_set",
           "write_optimisation_set", "state_from_data", "data_table_3d", "model3d_from_files",
           "optimiser_values_3d", "stored_settings", "sampling_from_files", "write_iteration_3d",
           "load_reference", "add_arguments", "main"]

#: labels of a RELION optimisation set (``data_`` key-value block), in RELION's order
OPTIMISATION_SET_LABELS = ("rlnTomoTomogramsFile", "rlnTomoParticlesFile", "rlnTomoTrajectoriesFile",
                           "rlnTomoManifoldsFile", "rlnTomoReferenceMap1File", "rlnTomoReferenceMap2File",
                           "rlnTomoReferenceMaskFile", "rlnTomoReferenceFscFile")


@dataclass
class Refine3DResult:
    """What :func:`refine_3d` produced: the last files written (the final ``run_*`` files once converged)."""

    prefix: Path
    iteration: int
    converged: bool
    data_star: Path
    optimiser_star: Path
    model_star: Path
    map: Path | None  # <prefix>_class001.mrc (joined, final) or None
    half_maps: list[Path]  # unfiltered half maps (final) or the iteration's half maps
    optimisation_set: Path | None
    optimiser: Optimiser3D


# ------------------------------------------------------------------------------------------------ optimisation sets

def is_optimisation_set(path: str | os.PathLike) -> bool:
    """True if ``path`` is a STAR file with a ``rlnTomoParticlesFile`` entry (a RELION optimisation set); looks
    at the first 64 kB only, so a large particles file is not parsed twice."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return b"_rlnTomoParticlesFile" in head


def read_optimisation_set(path: str | os.PathLike) -> dict:
    """The key-value entries of a RELION optimisation set (``rlnTomoParticlesFile``, ``rlnTomoTomogramsFile``,
    ``rlnTomoReferenceMap1File`` …) as a dict; raises InputFileError without ``rlnTomoParticlesFile``."""
    path = Path(path)
    for block in read_star(path).values():
        if isinstance(block, dict) and "rlnTomoParticlesFile" in block:
            return dict(block)
    raise InputFileError(path, "no rlnTomoParticlesFile entry",
                         "give a particles STAR file or an optimisation set from a RELION 4/5 tomography job")


def write_optimisation_set(path: str | os.PathLike, values: dict) -> None:
    """Write an optimisation set (one unnamed ``data_`` key-value block, RELION's layout) atomically; known labels
    first in RELION's order, then any others as given."""
    ordered = {k: values[k] for k in OPTIMISATION_SET_LABELS if k in values}
    ordered.update({k: v for k, v in values.items() if k not in ordered})
    write_star(path, {"": ordered}, version=50001)


# ------------------------------------------------------------------------------------------------ particles

def is_tomo_particles(path: str | os.PathLike) -> bool:
    """True if ``path`` is a tomography particles STAR file (a ``rlnTomoName`` column in its first 64 kB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return b"_rlnTomoName" in head


def _to_frame(angles: np.ndarray, origins: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles (degrees) and origins ``[N, 3]`` expressed in another frame: ``Euler⁻¹(F·Euler(angles))``,
    ``F·origin`` for ``frames [N, 3, 3]`` (``A_sub``: subtomogram → tomogram frame; ``A_subᵀ``: back)."""
    from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler

    a = torch.as_tensor(angles, dtype=torch.float64)
    Fm = torch.as_tensor(frames, dtype=torch.float64)
    A = Fm @ euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    return matrix_to_euler(A).numpy(), np.einsum("nij,nj->ni", frames, origins)


def tomo_optimiser(particles_path: Path, s: Refine3DSettings, references: list | None, solvent_mask, dev,
                   root: Path, progress, log, tomograms_path=None, update_rule=None,
                   angle_sigmas: tuple[float, float] = (0.0, 0.0), resume=None):
    """``(optimiser, None, write_data, mask_name)`` for tomographic particles: 3D pseudo-subtomograms on
    :class:`~cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D` or 2D stacks on
    :class:`~cryopipe.engine.tomo_optimiser.StackOptimiser3D` (orientations and origins in the tomogram frame
    while refining, written back in the subtomogram frame), initialised from the reference(s) rescaled to the
    data's greyscale, or de novo from random blobs without ``references`` (``update_rule``: gradient runs).
    ``angle_sigmas``: RELION's ``--sigma_tilt`` / ``--sigma_psi`` (degrees; 0 = none), priors on the
    subtomogram-frame tilt / psi in global searches centred on rlnAngleTiltPrior / rlnAnglePsiPrior or the
    input angles (:mod:`cryopipe.engine.tomo_priors`). ``resume(particle_set) → (model, sampling, iteration)``:
    continue a run (no initialisation; the particles file is the run's last ``_data.star``)."""
    from cryopipe.engine.stream import ParticleSet
    from cryopipe.engine.tomo_optimiser import StackOptimiser3D, SubtomoOptimiser3D
    from cryopipe.io.tomo_particles import read_tomo_particles
    from cryopipe.tomo.subtomo_set import particle_form, subtomo_volumes, tilt_stacks

    form = particle_form(read_tomo_particles(particles_path))
    if form == "none":
        raise InputFileError(particles_path, "names no particle images (rlnImageName)",
                             "run subtomo first and refine its optimisation set")
    if form == "2d":
        if tomograms_path is None:
            raise InputFileError(particles_path, "holds 2D stacks, whose CTFs come from the tomograms",
                                 "give the optimisation set (--ios) or --tomograms tomograms.star")
        sv = tilt_stacks(particles_path, tomograms_path, root)
        ps = ParticleSet(sv.n, sv.pixel_size, lambda idx: None, None, sv.optics_group, sv.optics_group.copy())
    else:
        sv = subtomo_volumes(particles_path, root)
        ps = ParticleSet(sv.n, sv.pixel_size, sv.read_data, None, sv.optics_group, sv.optics_group.copy())
    vol = None
    if references is not None:
        vol = torch.stack([load_reference(r, ps.n, ps.pixel_size, "--ref", log) for r in references]).mean(dim=0)
    mask_t, mask_name = None, "None"
    if solvent_mask is not None:
        mask_t = load_reference(solvent_mask, ps.n, ps.pixel_size, "--solvent_mask", log)
        mask_name = _rel(Path(solvent_mask), root)
    n = len(sv.subset)
    angles, origins = sv.angles.copy(), sv.origins_px.copy()
    if form == "2d":  # the stacks' rotations R_f refer to the tomogram frame: A_sub·A, A_sub·origin
        angles, origins = _to_frame(angles, origins, sv.A_sub)
    state = ParticleState3D(angles, origins, np.full(n, -1, np.int64), sv.subset.copy(), np.ones(n), np.zeros(n),
                            np.zeros(n), np.zeros(n, np.int64))
    kw = dict(state=state, device=dev, progress=progress, solvent_mask=mask_t, update_rule=update_rule)
    if resume is not None:  # --continue: the stored model, sampling state and iteration
        model, sampling, start = resume(ps)
        kw.update(model=model, sampling=sampling, iteration=start)
    if form == "2d":
        opt = StackOptimiser3D(ps, s, sv, **kw)
    else:
        opt = SubtomoOptimiser3D(ps, s, sv.read_weights, **kw)
    if angle_sigmas[0] > 0 or angle_sigmas[1] > 0:
        from cryopipe.engine.tomo_priors import AnglePriors, prior_centres

        tilt_c, psi_c = prior_centres(sv.particles.particles)
        opt.angle_priors = AnglePriors(tilt_c, psi_c, float(angle_sigmas[0]), float(angle_sigmas[1]),
                                       frames=sv.A_sub if form == "2d" else None)
        log(f"priors on the subtomogram-frame angles in global searches: σ_tilt {angle_sigmas[0]:g}°, "
            f"σ_psi {angle_sigmas[1]:g}° (centres: rlnAngleTiltPrior / rlnAnglePsiPrior, else the input angles)")
    if resume is not None:
        return opt, None, _tomo_data_writer(opt, sv, form), mask_name
    opt.initialise(vol, absolute_greyscale=False)
    if vol is None:
        return opt, None, _tomo_data_writer(opt, sv, form), mask_name
    n1 = int((opt.state.subset == 1).sum())
    what = "2D-stack particles" if form == "2d" else "pseudo-subtomograms"
    log(f"3D auto-refine of {ps.size} {what} (half-sets {n1} / {ps.size - n1}), box {ps.n}, "
        f"{ps.pixel_size:.3f} Å/px, symmetry {s.symmetry}, reference low-passed to {s.ini_high:g} Å and rescaled "
        f"to the data's greyscale")

    return opt, None, _tomo_data_writer(opt, sv, form), mask_name


def _tomo_data_writer(opt, sv, form: str):
    """``write_data(path)``: the refined tomographic particles in RELION's layout (subtomogram frame)."""
    from cryopipe.tomo.subtomo_set import refined_tomo_particles, write_refined_particles

    def write_data(path: Path) -> None:
        st = opt.state
        cols = {"rlnGroupNumber": opt.p.group + 1, "rlnClassNumber": np.maximum(st.klass, 0) + 1,
                "rlnNormCorrection": st.norm, "rlnRandomSubset": st.subset.astype(np.int64),
                "rlnLogLikeliContribution": st.loglik, "rlnMaxValueProbDistribution": st.pmax,
                "rlnNrOfSignificantSamples": st.nsig.astype(np.int64)}
        angles, origins = st.angles, st.origin
        if form == "2d":
            angles, origins = _to_frame(angles, origins, np.transpose(sv.A_sub, (0, 2, 1)))
        write_refined_particles(path, refined_tomo_particles(sv.particles, angles, origins, opt.p.pixel_size, cols))

    return write_data


def state_from_data(data: ParticleData, origin: np.ndarray, source: str | os.PathLike = "particles STAR file"
                    ) -> ParticleState3D:
    """Particle assignments from a particles / ``_data.star`` table: angles (degrees; zeros where absent),
    ``origin`` (pixels, from :func:`cryopipe.jobs.class2d.load_particles`), rlnClassNumber (1-based → 0-based;
    −1 where absent: "none yet"), rlnRandomSubset (1/2; 0 = not assigned), norm, log-likelihood, pmax, nsig."""
    t = data.particles
    n = len(t)
    st = ParticleState3D.empty(n, origin, euler_angles(data))

    def num(col: str, fill: float) -> np.ndarray:
        return pd.to_numeric(t[col], errors="coerce").fillna(fill).to_numpy()

    if "rlnClassNumber" in t.columns:
        st.klass = np.array(num("rlnClassNumber", 0).astype(np.int64) - 1)
    if "rlnRandomSubset" in t.columns:
        sub = num("rlnRandomSubset", 0).astype(np.int64)
        bad = (sub < 0) | (sub > 2)
        if bad.any():
            raise InputFileError(source, f"rlnRandomSubset has values other than 1 and 2 (e.g. {int(sub[bad][0])})",
                                 "remove the rlnRandomSubset column to draw new half-sets")
        st.subset = np.array(sub)
    for col, attr, fill in (("rlnNormCorrection", "norm", 1.0), ("rlnLogLikeliContribution", "loglik", 0.0),
                            ("rlnMaxValueProbDistribution", "pmax", 0.0)):
        if col in t.columns:
            setattr(st, attr, np.array(num(col, fill).astype(float)))
    if "rlnNrOfSignificantSamples" in t.columns:
        st.nsig = np.array(num("rlnNrOfSignificantSamples", 0).astype(np.int64))
    return st


def data_table_3d(data: ParticleData, opt: Optimiser3D) -> ParticleData:
    """The input table with the optimiser's assignments (RELION ``_data.star`` columns; origins in Å; rot and
    psi in [−180, 180)); rlnRandomSubset with half-sets only."""
    st, apix = opt.state, opt.p.pixel_size
    t = data.particles.copy()
    wrap = lambda a: (a + 180.0) % 360.0 - 180.0  # noqa: E731
    cols = {
        "rlnGroupNumber": opt.p.group + 1,
        "rlnAngleRot": wrap(st.angles[:, 0]),
        "rlnAngleTilt": st.angles[:, 1],
        "rlnAnglePsi": wrap(st.angles[:, 2]),
        "rlnOriginXAngst": st.origin[:, 0] * apix,
        "rlnOriginYAngst": st.origin[:, 1] * apix,
        "rlnClassNumber": np.maximum(st.klass, 0) + 1,
        "rlnNormCorrection": st.norm,
        "rlnLogLikeliContribution": st.loglik,
        "rlnMaxValueProbDistribution": st.pmax,
        "rlnNrOfSignificantSamples": st.nsig.astype(np.int64),
    }
    if opt.s.split_halves:
        cols["rlnRandomSubset"] = st.subset.astype(np.int64)
    for k, v in cols.items():
        t[k] = v
    out = data.copy()
    out.particles = t
    return out


def load_reference(path: str | os.PathLike, box: int, pixel_size: float, what: str = "--ref",
                   log=print) -> torch.Tensor:
    """A cubic MRC map with the particles' box (``[n, n, n]`` float32); a pixel size differing by > 1 % from
    the particles' is reported (not rescaled)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, f"{what} map not found", "give an existing MRC file")
    vol, apix = read_mrc(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputFileError(path, f"{what} map has shape {tuple(vol.shape)}, not a cube",
                             "give a cubic 3D map (.mrc)")
    if vol.shape[-1] != box:
        raise InputFileError(path, f"{what} box {vol.shape[-1]} differs from the particle box {box}",
                             "re-box or rescale the map to the particles (relion_image_handler --new_box "
                             "--rescale_angpix)")
    if apix > 0 and abs(apix - 1.0) > 1e-6 and abs(apix - pixel_size) > 0.01 * pixel_size:
        log(f"warning: {path}: pixel size {apix:g} Å differs from the particles' {pixel_size:g} Å "
            "(used as it is)")
    return torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ model files

def model3d_from_files(model_paths: list[Path], ps, bases: list[Path], device, symmetry: str,
                       tau2_fudge: float | None = None) -> Model3D:
    """A :class:`Model3D` from one ``_model.star`` per model (two half models, or one) and their maps
    (``rlnReferenceImage``); spectra, FSC, noise, class table and general values as written by
    :func:`cryopipe.engine.relion_files.write_model_star_3d` (or RELION)."""
    files = [read_model_star(p) for p in model_paths]
    g = files[0].general
    path0 = model_paths[0]
    if int(g.get("rlnReferenceDimensionality", 3)) != 3:
        raise InputFileError(path0, "is not a 3D model (rlnReferenceDimensionality != 3)",
                             "continue a 2D classification with class2d")
    n = int(g["rlnOriginalImageSize"])
    if n != ps.n:
        raise InputFileError(path0, f"rlnOriginalImageSize {n} differs from the particle box {ps.n}",
                             "continue with the same particles")
    K = files[0].n_classes
    for p, f in zip(model_paths, files):
        if f.n_classes != K:
            raise InputFileError(p, f"{f.n_classes} classes but {path0} has {K}", "give the half models of one run")
        if f.sigma2_noise.shape[0] != ps.n_optics_groups:
            raise InputFileError(p, f"{f.sigma2_noise.shape[0]} optics groups but the particles have "
                                    f"{ps.n_optics_groups}", "continue with the same particles")
    vols = []
    for p, f in zip(model_paths, files):
        row = []
        for nm in f.classes["rlnReferenceImage"].astype(str):  # K maps
            arr, _ = read_mrc(resolve_relion_path(nm, *bases, p.resolve().parent))
            if arr.shape != (n, n, n):
                raise InputFileError(nm, f"map shape {arr.shape} differs from the model's box {n}",
                                     "continue from an unmodified run")
            row.append(np.ascontiguousarray(arr, dtype=np.float32))
        vols.append(np.stack(row))
    apix = float(g["rlnPixelSize"])
    c = files[0].classes
    col = lambda name, fill: torch.as_tensor(  # noqa: E731
        np.array(c[name].to_numpy(float)) if name in c.columns else np.full(K, fill), dtype=torch.float64)
    stack = lambda attr: torch.as_tensor(np.stack([getattr(f, attr) for f in files]),  # noqa: E731
                                         dtype=torch.float64)
    ngroups = int(ps.n_groups)
    scale = np.ones(ngroups)
    gt = files[0].groups
    if gt is not None and "rlnGroupScaleCorrection" in gt.columns and len(gt) == ngroups:
        scale = np.array(gt["rlnGroupScaleCorrection"].to_numpy(float))
    res_A = float(g.get("rlnCurrentResolution", 0.0))
    fsc = files[0].fsc if files[0].fsc is not None else np.zeros((K, n // 2 + 1))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return Model3D(
        vols=torch.as_tensor(np.stack(vols)), pixel_size=apix, symmetry=symmetry,
        pdf_class=col("rlnClassDistribution", 1.0 / K),
        sigma2_offset=(float(g.get("rlnSigmaOffsetsAngst", 0.0)) / apix) ** 2,
        sigma2_noise=torch.as_tensor(files[0].sigma2_noise, dtype=torch.float64, device=dev),
        tau2_fudge=float(g.get("rlnTau2FudgeFactor", 1.0)) if tau2_fudge is None else float(tau2_fudge),
        tau2=stack("tau2"), sigma2_ref=stack("sigma2_ref"), data_vs_prior=stack("ssnr"),
        fourier_coverage=stack("fourier_coverage"), fsc=torch.as_tensor(fsc, dtype=torch.float64),
        acc_rot=col("rlnAccuracyRotations", 999.0), acc_trans=col("rlnAccuracyTranslationsAngst", 999.0),
        estimated_resolution=col("rlnEstimatedResolution", 0.0),
        total_fourier_coverage=col("rlnOverallFourierCompleteness", 0.0),
        current_resolution=1.0 / res_A if 0 < res_A < 999.0 else 0.0,
        current_size=int(g.get("rlnCurrentImageSize", n)),
        avg_norm_correction=float(g.get("rlnNormCorrectionAverage", 1.0)),
        scale_correction=torch.as_tensor(scale, dtype=torch.float64, device=dev),
        group_counts=torch.as_tensor(np.bincount(ps.group, minlength=ngroups), dtype=torch.float64),
        LL=float(g.get("rlnLogLikelihood", 0.0)), ave_pmax=float(g.get("rlnAveragePmax", 0.0)),
        padding_factor=int(round(float(g.get("rlnPaddingFactor", 2)))))


# ------------------------------------------------------------------------------------------------ optimiser.star

def optimiser_values_3d(opt: Optimiser3D, prefix_rel: str, files: dict[str, str], n_iter: int, *,
                        solvent_mask: str = "None", input_set: str = "None", extra: dict | None = None) -> dict:
    """``data_optimiser_general`` of a 3D run: RELION's labels, plus ``cryopipe*`` entries for state RELION does
    not store (RELION ignores unknown labels) so that ``--continue`` restores the auto-sampling exactly."""
    s, m, smp = opt.s, opt.model, opt.sampling
    active = m.pdf_class.cpu() > 0
    vals = {
        "rlnOutputRootName": prefix_rel,
        "rlnModelStarFile": files["model"],
    }
    if "model2" in files:
        vals["rlnModelStarFile2"] = files["model2"]
    vals.update({
        "rlnExperimentalDataStarFile": files["data"],
        "rlnOrientSamplingStarFile": files["sampling"],
        "rlnCurrentIteration": int(opt.iteration),
        "rlnNumberOfIterations": int(n_iter),
        "rlnDoSplitRandomHalves": int(s.split_halves),
        "rlnJoinHalvesUntilThisResolution": float(s.low_resol_join_halves) if s.split_halves else -1.0,
        "rlnAdaptiveOversampleOrder": int(s.oversampling),
        "rlnAdaptiveOversampleFraction": float(s.adaptive_fraction),
        "rlnRandomSeed": int(s.random_seed),
        "rlnParticleDiameter": float(opt.particle_diameter),
        "rlnWidthMaskEdge": int(round(s.width_mask_edge)),
        "rlnDoZeroMask": int(s.zero_mask),
        "rlnDoSolventFlattening": int(s.flatten_solvent),
        "rlnDoSolventFscCorrection": int(s.solvent_correct_fsc),
        "rlnSolventMaskName": solvent_mask,
        "rlnSolventMask2Name": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": -1.0,
        "rlnIncrementImageSize": int(s.incr_size),
        "rlnDoMapEstimation": 1,
        "rlnDoGradientRefine": int(s.grad),
        "rlnTau2FudgeArg": float(s.tau2_fudge),
        "rlnMaximumSignificantPoses": int(s.max_significant),
        "rlnDoAutoRefine": int(s.auto_refine and not s.grad),
        "rlnAutoLocalSearchesHealpixOrder": int(s.auto_local_healpix_order),
        "rlnNumberOfIterWithoutResolutionGain": int(smp.nr_iter_wo_resol_gain),
        "rlnBestResolutionThusFar": float(smp.best_resolution),
        "rlnNumberOfIterWithoutChangingAssignments": int(smp.nr_iter_wo_large_changes),
        "rlnOverallAccuracyRotations": float(m.acc_rot[active].min()) if active.any() else 999.0,
        "rlnOverallAccuracyTranslationsAngst": float(m.acc_trans[active].min()) if active.any() else 999.0,
        "rlnChangesOptimalOrientations": float(opt.changes["orientations"]),
        "rlnChangesOptimalOffsets": float(opt.changes["offsets"]),
        "rlnChangesOptimalClasses": float(opt.changes["classes"]),
        "rlnSmallestChangesOrientations": float(smp.smallest_changes_orient),
        "rlnSmallestChangesOffsets": float(smp.smallest_changes_offset),
        "rlnSmallestChangesClasses": float(smp.smallest_changes_class),
        "rlnHasConverged": int(smp.has_converged),
        "rlnHasHighFscAtResolLimit": 0,
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnDoCorrectNorm": int(s.do_norm),
        "rlnDoCorrectScale": int(s.do_scale),
        "rlnDoCorrectCtf": int(s.do_ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": int(s.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": 0,
        "rlnRefsAreCtfCorrected": int(s.do_ctf),
        "rlnPaddingFactor": float(s.pad),
        "rlnSamplingPerturbFactor": float(s.perturb),
        "rlnOffsetRangeX": -1.0,
        "rlnOffsetRangeY": -1.0,
        "rlnOffsetRangeZ": -1.0,
        # cryopipe-only state (RELION keeps these in memory or derives them from its command line)
        "cryopipeHasFineEnoughSampling": int(smp.has_fine_enough),
        "cryopipeFinalIterationDone": int(smp.final_done),
        "cryopipeAutoIgnoreAngles": int(s.auto_ignore_angles),
        "cryopipeAutoResolAngles": int(s.auto_resol_angles),
        "cryopipeNonNegative": int(s.non_negative),
        "cryopipeInputOptimisationSet": input_set,
    })
    if extra:
        vals.update(extra)
    return vals


def stored_settings(vals: dict, settings: Refine3DSettings, sampling_vals: dict) -> dict:
    """Refine3DSettings fields stored in an ``_optimiser.star`` / ``_sampling.star`` (cryopipe's or RELION's;
    missing entries keep the value of ``settings``)."""
    s = settings

    def get(label: str, cast, default):
        v = vals.get(label, None)
        return default if v is None else cast(v)

    b = lambda x: bool(int(x))  # noqa: E731
    apix_free = {
        "particle_diameter": get("rlnParticleDiameter", float, s.particle_diameter),
        "zero_mask": get("rlnDoZeroMask", b, s.zero_mask),
        "flatten_solvent": get("rlnDoSolventFlattening", b, s.flatten_solvent),
        "solvent_correct_fsc": get("rlnDoSolventFscCorrection", b, s.solvent_correct_fsc),
        "oversampling": get("rlnAdaptiveOversampleOrder", int, s.oversampling),
        "adaptive_fraction": get("rlnAdaptiveOversampleFraction", float, s.adaptive_fraction),
        "random_seed": get("rlnRandomSeed", int, s.random_seed),
        "width_mask_edge": get("rlnWidthMaskEdge", float, s.width_mask_edge),
        "incr_size": get("rlnIncrementImageSize", int, s.incr_size),
        "do_norm": get("rlnDoCorrectNorm", b, s.do_norm),
        "do_scale": get("rlnDoCorrectScale", b, s.do_scale),
        "do_ctf": get("rlnDoCorrectCtf", b, s.do_ctf),
        "ctf_intact_first_peak": get("rlnDoIgnoreCtfUntilFirstPeak", b, s.ctf_intact_first_peak),
        "max_significant": get("rlnMaximumSignificantPoses", int, s.max_significant),
        "tau2_fudge": get("rlnTau2FudgeArg", float, s.tau2_fudge),
        "auto_local_healpix_order": get("rlnAutoLocalSearchesHealpixOrder", int, s.auto_local_healpix_order),
        "pad": int(round(get("rlnPaddingFactor", float, s.pad))),
        "perturb": get("rlnSamplingPerturbFactor", float, s.perturb),
        "n_iter": get("rlnNumberOfIterations", int, s.n_iter),
        "auto_ignore_angles": get("cryopipeAutoIgnoreAngles", b, s.auto_ignore_angles),
        "auto_resol_angles": get("cryopipeAutoResolAngles", b, s.auto_resol_angles),
        "non_negative": get("cryopipeNonNegative", b, s.non_negative),
    }
    if float(vals.get("rlnJoinHalvesUntilThisResolution", -1.0)) > 0:
        apix_free["low_resol_join_halves"] = float(vals["rlnJoinHalvesUntilThisResolution"])
    if "rlnSymmetryGroup" in sampling_vals:
        apix_free["symmetry"] = str(sampling_vals["rlnSymmetryGroup"])
    if "rlnHealpixOrderOriginal" in sampling_vals:
        apix_free["healpix_order"] = int(sampling_vals["rlnHealpixOrderOriginal"])
    return apix_free


def sampling_from_files(vals: dict, sampling_vals: dict, model_general: dict, pixel_size: float) -> AutoSampling:
    """The :class:`AutoSampling` state stored by :func:`write_iteration_3d` (offsets Å → pixels; local-search σ
    from the model's orientational prior)."""
    sigma = 0.0
    if int(model_general.get("rlnOrientationalPriorMode", 0)) == 1:
        sigma = float(model_general.get("rlnSigmaPriorRotAngle", 0.0))
    return AutoSampling(
        healpix_order=int(sampling_vals["rlnHealpixOrder"]),
        offset_range=float(sampling_vals["rlnOffsetRange"]) / pixel_size,
        offset_step=float(sampling_vals["rlnOffsetStep"]) / pixel_size,
        sigma_ang=sigma,
        perturbation=float(sampling_vals.get("rlnSamplingPerturbInstance", 0.0)),
        nr_iter_wo_resol_gain=int(vals.get("rlnNumberOfIterWithoutResolutionGain", 0)),
        nr_iter_wo_large_changes=int(vals.get("rlnNumberOfIterWithoutChangingAssignments", 0)),
        best_resolution=float(vals.get("rlnBestResolutionThusFar", 0.0)),
        smallest_changes_orient=float(vals.get("rlnSmallestChangesOrientations", 999.0)),
        smallest_changes_offset=float(vals.get("rlnSmallestChangesOffsets", 999.0)),
        smallest_changes_class=float(vals.get("rlnSmallestChangesClasses", 9999999.0)),
        has_fine_enough=bool(int(vals.get("cryopipeHasFineEnoughSampling", 0))),
        has_converged=bool(int(vals.get("rlnHasConverged", 0))),
        final_done=bool(int(vals.get("cryopipeFinalIterationDone", 0))),
    )


# ------------------------------------------------------------------------------------------------ writing

def write_iteration_3d(opt: Optimiser3D, data: ParticleData, out_dir: Path, prefix: str, root: Path, n_iter: int,
                       command: str, original: tuple[int, float, float], *, final: bool = False,
                       solvent_mask: str = "None", input_set: str = "None", extra: dict | None = None,
                       write_data=None) -> dict[str, Path]:
    """Write one iteration's files (each atomically; the optimiser.star last, so that it only ever names
    complete files). With half-sets: ``_half{1,2}_model.star`` and ``_half{1,2}_classKKK.mrc``; without (initial
    model): ``_model.star`` and ``_classKKK.mrc``. ``final``: RELION's end-of-refinement files without the
    iteration number (joined map, unfiltered half maps, joined model). Returns the paths by kind
    (``data``, ``model``, ``model2``, ``sampling``, ``optimiser``, ``maps``, and for ``final`` ``map``,
    ``model_joined``, ``half_maps``). ``write_data(path)``: writes the ``_data.star`` instead of the
    single-particle table (tomographic particles)."""
    m, apix = opt.model, opt.p.pixel_size
    K = m.n_classes
    base = out_dir / (prefix if final else f"{prefix}_it{opt.iteration:03d}")
    paths: dict = {k: Path(f"{base}_{k}.star") for k in ("data", "sampling", "optimiser")}
    sigma_ang = float(opt.sampling.sigma_ang)
    vols = m.vols.detach().cpu().numpy().astype(np.float32)
    maps: list[Path] = []
    # orientation distribution over the sampling's directions (model.star pdf_orient, sampling.star directions)
    st = opt.state
    d_rot, d_tilt, d_idx = nearest_directions(st.angles, int(opt.sampling.healpix_order),
                                              m.symmetry if not opt.s.grad else "C1")

    def pdf_of(sel):
        return direction_histogram(d_idx[torch.as_tensor(sel)], st.klass[sel], K, d_rot.numel())

    pdf_all = pdf_of(np.ones(len(st.klass), dtype=bool))
    if opt.s.split_halves:
        for h in range(2):
            names = []
            for k in range(K):
                if final:
                    mp = Path(f"{base}_half{h + 1}_class{k + 1:03d}_unfil.mrc")
                    half = opt.last_halves[h] if opt.last_halves is not None else m.vols[h]
                    half = half.detach().cpu()
                    write_mrc(mp, (half[k] if half.dim() == 4 else half).numpy().astype(np.float32), apix)
                else:
                    mp = Path(f"{base}_half{h + 1}_class{k + 1:03d}.mrc")
                    write_mrc(mp, vols[h, k], apix)
                maps.append(mp)
                names.append(_rel(mp, root))
            mpath = Path(f"{base}_half{h + 1}_model.star")
            write_model_star_3d(mpath, m, h, names, sigma_ang=sigma_ang, pdf_orient=pdf_of(st.subset == h + 1))
            paths["model" if h == 0 else "model2"] = mpath
        if final:
            paths["half_maps"] = [maps[0], maps[K]]
            joined = []
            for k in range(K):
                mp = Path(f"{base}_class{k + 1:03d}.mrc")
                write_mrc(mp, vols[0, k], apix)
                joined.append(mp)
            paths["map"] = joined[0]
            paths["model_joined"] = Path(f"{base}_model.star")
            write_model_star_3d(paths["model_joined"], m, 0, [_rel(p, root) for p in joined], sigma_ang=sigma_ang,
                                pdf_orient=pdf_all)
    else:
        names = []
        for k in range(K):
            mp = Path(f"{base}_class{k + 1:03d}.mrc")
            write_mrc(mp, vols[0, k], apix)
            maps.append(mp)
            names.append(_rel(mp, root))
        paths["model"] = Path(f"{base}_model.star")
        write_model_star_3d(paths["model"], m, 0, names, sigma_ang=sigma_ang, pdf_orient=pdf_all)
    paths["maps"] = maps
    if write_data is not None:  # tomographic particles: their own layout (cryopipe.tomo.subtomo_set)
        write_data(paths["data"])
    else:
        write_particles(paths["data"], data_table_3d(data, opt), star_version=50001)
    write_sampling_star_3d(paths["sampling"], opt.sampling, apix, m.symmetry, original, opt.s.perturb,
                           directions=(d_rot, d_tilt))
    rel = {k: _rel(v, root) for k, v in paths.items() if isinstance(v, Path)}
    write_optimiser_star(paths["optimiser"],
                         optimiser_values_3d(opt, _rel(out_dir / prefix, root), rel, n_iter,
                                             solvent_mask=solvent_mask, input_set=input_set, extra=extra),
                         command)
    return paths


# ------------------------------------------------------------------------------------------------ the job

_CHANGE_LABELS = (("orientations", "rlnChangesOptimalOrientations"), ("offsets", "rlnChangesOptimalOffsets"),
                  ("classes", "rlnChangesOptimalClasses"))


def continue_inputs(continue_from: str | os.PathLike) -> tuple[dict, list[Path], Path, list[Path], dict, Path]:
    """Files of a run to continue: ``(optimiser values, bases, data.star, model.star paths, sampling values,
    sampling path)``; names are looked up from the current directory, then the project/job folder."""
    opt_path = Path(continue_from)
    if not opt_path.is_file():
        raise InputFileError(opt_path, "not found", "give a <prefix>_itNNN_optimiser.star of the run to continue")
    vals = read_optimiser_star(opt_path)
    here = opt_path.resolve().parent
    bases = [here.parent.parent, here.parent, here]
    for need in ("rlnExperimentalDataStarFile", "rlnModelStarFile", "rlnOrientSamplingStarFile"):
        if need not in vals:
            raise InputFileError(opt_path, f"no {need} entry", "give a relion_refine _optimiser.star")
    data_path = resolve_relion_path(str(vals["rlnExperimentalDataStarFile"]), *bases)
    models = [resolve_relion_path(str(vals["rlnModelStarFile"]), *bases)]
    if "rlnModelStarFile2" in vals and str(vals["rlnModelStarFile2"]) not in ("", "None"):
        models.append(resolve_relion_path(str(vals["rlnModelStarFile2"]), *bases))
    samp_path = resolve_relion_path(str(vals["rlnOrientSamplingStarFile"]), *bases)
    return vals, bases, data_path, models, read_sampling_star(samp_path), samp_path


def refine_3d(
    particles_star: str | os.PathLike | None,
    output: str | os.PathLike,
    settings: Refine3DSettings | None = None,
    *,
    reference: str | os.PathLike | None = None,
    solvent_mask: str | os.PathLike | None = None,
    absolute_greyscale: bool = True,
    continue_from: str | os.PathLike | None = None,
    overrides: dict | None = None,
    device: str | torch.device | None = None,
    root: str | os.PathLike | None = None,
    command: str = "",
    log=print,
    progress=None,
    tomograms: str | os.PathLike | None = None,
    angle_sigmas: tuple[float, float] = (0.0, 0.0),
    backend=None,
) -> Refine3DResult:
    """Run (or continue) a gold-standard 3D auto-refinement, writing RELION-named files every iteration.

    Args:
        particles_star: particles STAR file or optimisation set (ignored when continuing).
        output: RELION prefix (``Refine3D/job011/run``) or directory (prefix ``run``).
        settings: options (:class:`Refine3DSettings`; ``split_halves`` and ``auto_refine`` are forced on, ``grad``
            off). When continuing, the stored options are used except those named in ``overrides``.
        reference: initial map (MRC, the particles' box); from an optimisation set its reference map(s) are the
            default.
        solvent_mask: optional MRC mask (the particles' box) for solvent flattening instead of the sphere.
        absolute_greyscale: the reference is on the particles' greyscale (RELION: no ``--firstiter_cc``);
            False rescales it to the particles' signal power.
        continue_from: an ``_optimiser.star`` of an earlier iteration of this kind of run.
        overrides: ``{field: value}`` of :class:`Refine3DSettings` given explicitly (they win over stored ones).
        root: directory that names in the STAR files are relative to (the project directory; default cwd).
        log, progress: a line logger and a progress wrapper (``progress(iterable, desc=...)``).
        tomograms: tomograms.star of tomographic particles given as ``--i particles.star`` (RELION's
            ``--tomograms``); recorded in the ``run_optimisation_set.star`` written at the end.
        angle_sigmas: ``(σ_tilt, σ_psi)`` degrees, RELION's ``--sigma_tilt`` / ``--sigma_psi`` priors for
            tomographic particles (0: none; :mod:`cryopipe.engine.tomo_priors`).
        backend: where the E-step chunks run (:func:`cryopipe.engine.backend.make_backend`; default in-process).

    Tomographic particles (a particles file with rlnTomoName, directly or through an optimisation set) are
    refined as 3D pseudo-subtomograms (:class:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`; the form is
    chosen as RELION chooses it, :func:`cryopipe.tomo.subtomo_set.particle_form`); their reference is always
    rescaled to the data's greyscale, and the ``_data.star`` keeps the tomography layout.
    """
    dev = resolve_device(device)
    write_data = None
    root = Path(root) if root is not None else Path.cwd()
    out_dir, prefix = split_output_prefix(output)
    overrides = dict(overrides or {})
    settings = settings if settings is not None else Refine3DSettings()
    input_set: str = "None"
    set_values: dict | None = None
    mask_name = "None"
    opt = None
    if continue_from is not None:
        vals, bases, data_path, model_paths, sv, _ = continue_inputs(continue_from)
        if int(vals.get("rlnDoAutoRefine", 0)) != 1 or int(vals.get("rlnDoSplitRandomHalves", 0)) != 1 \
                or len(model_paths) != 2:
            raise InputFileError(continue_from, "is not from a gold-standard auto-refinement (rlnDoAutoRefine, "
                                                "rlnDoSplitRandomHalves, two model files)",
                                 "continue an initial model with `cryopipe initialmodel --continue`")
        if int(vals.get("cryopipeFinalIterationDone", 0)):
            raise InputFileError(continue_from, "the refinement has already finished (final iteration done)",
                                 "start a new refinement from its run_data.star and run_class001.mrc")
        kw = {f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)}
        kw.update({k: v for k, v in stored_settings(vals, settings, sv).items() if k not in overrides})
        kw.update({k: v for k, v in overrides.items() if k in kw})
        model_general = read_model_star(model_paths[0]).general
        kw["n_classes"] = int(model_general.get("rlnNrClasses", 1))
        s = Refine3DSettings(**{**kw, "split_halves": True, "auto_refine": True, "grad": False})
        if is_tomo_particles(data_path):  # the last _data.star (tomography layout) and the stored model
            start = int(vals.get("rlnCurrentIteration", 0))
            input_set = str(vals.get("cryopipeInputOptimisationSet", "None"))
            if input_set not in ("", "None"):
                set_values = read_optimisation_set(resolve_relion_path(input_set, *bases))
            tomo_name = str(vals.get("cryopipeTomogramsFile", (set_values or {}).get("rlnTomoTomogramsFile", "None")))
            tomo_path = resolve_relion_path(tomo_name, *bases) if tomo_name not in ("", "None") else None
            if set_values is None:
                set_values = {"rlnTomoParticlesFile": _rel(data_path, root)}
                if tomo_path is not None:
                    set_values["rlnTomoTomogramsFile"] = tomo_name
            mask_name = _rel(Path(solvent_mask), root) if solvent_mask is not None else \
                str(vals.get("rlnSolventMaskName", "None"))
            mask_path = resolve_relion_path(mask_name, *bases) if mask_name not in ("", "None") else None

            def resume(ps):
                model = model3d_from_files(model_paths, ps, bases, dev, s.symmetry, overrides.get("tau2_fudge"))
                return model, sampling_from_files(vals, sv, model_general, ps.pixel_size), start

            opt, data, write_data, _ = tomo_optimiser(data_path, s, None, mask_path, dev, root, progress, log,
                                                      tomo_path, angle_sigmas=angle_sigmas, resume=resume)
            ps = opt.p
            for key, lab in _CHANGE_LABELS:
                if lab in vals:
                    opt.changes[key] = float(vals[lab])
            original = (int(sv.get("rlnHealpixOrderOriginal", opt.sampling.healpix_order)),
                        float(sv.get("rlnOffsetRangeOriginal", opt.sampling.offset_range * ps.pixel_size))
                        / ps.pixel_size,
                        float(sv.get("rlnOffsetStepOriginal", opt.sampling.offset_step * ps.pixel_size))
                        / ps.pixel_size)
            log(f"continuing from {continue_from} (iteration {start}, {ps.size} tomographic particles, HEALPix "
                f"order {opt.sampling.healpix_order}{', local searches' if opt.sampling.sigma_ang > 0 else ''})")
    if continue_from is not None and opt is None:
        data, ps, origin = load_particles(data_path, "3D refinement")
        model = model3d_from_files(model_paths, ps, bases, dev, s.symmetry, overrides.get("tau2_fudge"))
        state = state_from_data(data, origin, data_path)
        samp = sampling_from_files(vals, sv, model_general, ps.pixel_size)
        mask_t = None
        mask_name = str(vals.get("rlnSolventMaskName", "None"))
        if solvent_mask is not None:
            mask_name = _rel(Path(solvent_mask), root)
        if mask_name not in ("", "None"):
            mask_t = load_reference(resolve_relion_path(mask_name, *bases), ps.n, ps.pixel_size, "--solvent_mask",
                                    log)
        input_set = str(vals.get("cryopipeInputOptimisationSet", "None"))
        if input_set not in ("", "None"):
            set_values = read_optimisation_set(resolve_relion_path(input_set, *bases))
        start = int(vals.get("rlnCurrentIteration", 0))
        opt = Optimiser3D(ps, s, model=model, state=state, sampling=samp, iteration=start, device=dev,
                          progress=progress, solvent_mask=mask_t)
        for key, lab in _CHANGE_LABELS:
            if lab in vals:
                opt.changes[key] = float(vals[lab])
        original = (int(sv.get("rlnHealpixOrderOriginal", samp.healpix_order)),
                    float(sv.get("rlnOffsetRangeOriginal", samp.offset_range * ps.pixel_size)) / ps.pixel_size,
                    float(sv.get("rlnOffsetStepOriginal", samp.offset_step * ps.pixel_size)) / ps.pixel_size)
        log(f"continuing from {continue_from} (iteration {start}, {ps.size} particles, HEALPix order "
            f"{samp.healpix_order}{', local searches' if samp.sigma_ang > 0 else ''})")
    elif continue_from is None:
        if particles_star is None:
            raise CryopipeError("--i (particles STAR file or optimisation set) is required unless --continue is given")
        particles_path = Path(particles_star)
        if not particles_path.is_file():
            raise InputFileError(particles_path, "not found", "give the particles STAR file or optimisation set (--i)")
        set_bases: list = []
        if is_optimisation_set(particles_path):
            set_values = read_optimisation_set(particles_path)
            input_set = _rel(particles_path, root)
            set_bases = [particles_path.resolve().parent, particles_path.resolve().parent.parent.parent]
            particles_path = resolve_relion_path(str(set_values["rlnTomoParticlesFile"]), *set_bases)
            if reference is None:
                refs = [set_values.get(k) for k in ("rlnTomoReferenceMap1File", "rlnTomoReferenceMap2File")]
                refs = [resolve_relion_path(str(r), *set_bases) for r in refs if r not in (None, "", "None")]
                reference = refs if refs else None
            if solvent_mask is None and set_values.get("rlnTomoReferenceMaskFile") not in (None, "", "None"):
                solvent_mask = resolve_relion_path(str(set_values["rlnTomoReferenceMaskFile"]), *set_bases)
        if reference is None:
            raise CryopipeError("--ref (initial reference map, MRC) is required for 3D refinement "
                                "(e.g. InitialModel/jobNNN/initial_model.mrc)")
        s = Refine3DSettings(**{**{f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)},
                                "split_halves": True, "auto_refine": True, "grad": False})
        if is_tomo_particles(particles_path):
            if set_values is None:
                set_values = {"rlnTomoParticlesFile": _rel(particles_path, root)}
                if tomograms is not None:
                    set_values["rlnTomoTomogramsFile"] = _rel(Path(tomograms), root)
            ref_list = reference if isinstance(reference, list) else [reference]
            tomo_path = tomograms
            if set_values.get("rlnTomoTomogramsFile") not in (None, "", "None") and tomo_path is None:
                tomo_path = resolve_relion_path(str(set_values["rlnTomoTomogramsFile"]), root,
                                                particles_path.resolve().parent, *set_bases)
            opt, data, write_data, mask_name = tomo_optimiser(particles_path, s, ref_list, solvent_mask, dev, root,
                                                               progress, log, tomo_path, angle_sigmas=angle_sigmas)
            original = (int(s.healpix_order), float(s.offset_range), float(s.offset_step))
            ps = opt.p
        else:
            opt = None
    if opt is None:
        if angle_sigmas[0] > 0 or angle_sigmas[1] > 0:
            raise CryopipeError("--sigma_tilt / --sigma_psi are implemented for tomographic particles only (an "
                                "optimisation set or particles with rlnTomoName); use --sigma_ang for local searches")
        data, ps, origin = load_particles(particles_path, "3D refinement")
        if s.do_ctf and ps.ctf is None:
            raise InputFileError(particles_path, "--ctf was given but the particles have no rlnDefocusU column",
                                 "run CTF estimation and extraction with CTF values, or leave out --ctf")
        ref_list = reference if isinstance(reference, list) else [reference]
        vol = torch.stack([load_reference(r, ps.n, ps.pixel_size, "--ref", log) for r in ref_list]).mean(dim=0)
        mask_t = None
        if solvent_mask is not None:
            mask_t = load_reference(solvent_mask, ps.n, ps.pixel_size, "--solvent_mask", log)
            if float(mask_t.min()) < -1e-3 or float(mask_t.max()) > 1.001:
                raise InputFileError(solvent_mask, f"values span [{float(mask_t.min()):.3g}, "
                                                   f"{float(mask_t.max()):.3g}], not [0, 1]",
                                     "give a mask from mask-create (0 = solvent, 1 = protein)")
            mask_name = _rel(Path(solvent_mask), root)
        state = state_from_data(data, origin, particles_path)
        state.klass[:] = -1  # classes of earlier jobs are not this run's
        opt = Optimiser3D(ps, s, state=state, device=dev, progress=progress, solvent_mask=mask_t)
        opt.initialise(vol, absolute_greyscale=absolute_greyscale)
        n1 = int((opt.state.subset == 1).sum())
        log(f"3D auto-refine: {ps.size} particles (half-sets {n1} / {ps.size - n1}), box {ps.n}, "
            f"{ps.pixel_size:.3f} Å/px, symmetry {s.symmetry}, reference low-passed to {s.ini_high:g} Å"
            + ("" if absolute_greyscale else " and rescaled to the particles' greyscale"))
        original = (int(s.healpix_order), float(s.offset_range), float(s.offset_step))
    if opt.particle_diameter > ps.n * ps.pixel_size:
        log(f"warning: --particle_diameter {opt.particle_diameter:g} Å is larger than the box "
            f"({ps.n * ps.pixel_size:g} Å)")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_iter = int(s.n_iter)
    extra = None
    if write_data is not None and set_values is not None and \
            set_values.get("rlnTomoTomogramsFile") not in (None, "", "None"):  # for --continue
        extra = {"cryopipeTomogramsFile": str(set_values["rlnTomoTomogramsFile"])}
    write = lambda final=False: write_iteration_3d(  # noqa: E731
        opt, data, out_dir, prefix, root, n_iter, command, original, final=final, solvent_mask=mask_name,
        input_set=input_set, write_data=write_data, extra=extra)
    paths = None
    if continue_from is None:
        paths = write()
    opt.backend = backend if backend is not None else opt.backend
    while not opt.converged and opt.iteration < n_iter:
        if opt.iteration >= n_iter - 1 and not opt.sampling.has_converged:
            log(f"warning: not converged after {opt.iteration} iterations; iteration {opt.iteration + 1} "
                f"(--iter {n_iter}) is the final one (halves joined); give a larger --iter to refine further")
            opt.finish_next()
        rep = opt.iterate()
        log(rep.line())
        if hasattr(opt, "memory_line"):  # tomographic particles: peak memory per batch
            log(opt.memory_line())
        paths = write(final=opt.converged)
    if paths is None:
        raise CryopipeError(f"--iter {n_iter}: nothing to do, the run is already at iteration {opt.iteration} "
                            "(give a larger --iter to continue)")
    set_path = None
    if opt.converged:
        log(f"finished after {opt.iteration} iterations: final map {paths['map']}, half maps "
            f"{paths['half_maps'][0].name}, {paths['half_maps'][1].name} (resolution: cryopipe postprocess)")
        if set_values is not None:
            set_path = out_dir / f"{prefix}_optimisation_set.star"
            new = dict(set_values)
            new["rlnTomoParticlesFile"] = _rel(paths["data"], root)
            new["rlnTomoReferenceMap1File"] = _rel(paths["half_maps"][0], root)
            new["rlnTomoReferenceMap2File"] = _rel(paths["half_maps"][1], root)
            if mask_name not in ("", "None"):
                new["rlnTomoReferenceMaskFile"] = mask_name
            write_optimisation_set(set_path, new)
    return Refine3DResult(out_dir / prefix, opt.iteration, opt.converged, paths["data"], paths["optimiser"],
                          paths.get("model_joined", paths["model"]), paths.get("map"),
                          list(paths.get("half_maps", paths["maps"][:1] + paths["maps"][-1:])), set_path, opt)


# ------------------------------------------------------------------------------------------------ CLI

#: CLI defaults (RELION's, where the GUI / relion_refine has one)
DEFAULTS = dict(n_iter=50, tau2_fudge=1.0, particle_diameter=-1.0, healpix_order=2, auto_local_healpix_order=4,
                offset_range=5.0, offset_step=1.0, oversampling=1, low_resol_join_halves=40.0, ini_high=50.0,
                sigma_ang=0.0, adaptive_fraction=0.999, max_significant=200, perturb=0.5, batch_size=32,
                incr_size=10, symmetry="C1", zero_mask=False, flatten_solvent=False, do_norm=False, do_scale=False,
                auto_ignore_angles=False, auto_resol_angles=False, pad=2, random_seed=0, do_ctf=False,
                ctf_intact_first_peak=False, solvent_correct_fsc=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input/output")
    g.add_argument("--i", "--ios", dest="i", default=None,
                   help="particles STAR file, or an optimisation set (rlnTomoParticlesFile …)")
    g.add_argument("--tomograms", default=None,
                   help="tomograms.star of tomographic particles given with --i particles.star (an optimisation "
                        "set names its own)")
    g.add_argument("--o", dest="o", default=None,
                   help="output prefix, RELION style (e.g. Refine3D/job011/run); a directory means prefix 'run'")
    g.add_argument("--ref", default=None, help="initial reference map (MRC, the particles' box)")
    g.add_argument("--solvent_mask", default=None, help="mask (MRC, 0..1) for solvent flattening")
    g.add_argument("--solvent_correct_fsc", action="store_true", default=None,
                   help="FSC of the half maps inside --solvent_mask, corrected by phase randomisation (resolution "
                        "and regularisation follow the masked FSC)")
    g.add_argument("--continue", dest="continue_", default=None, metavar="OPTIMISER_STAR",
                   help="continue from this _itNNN_optimiser.star; --o defaults to its prefix")
    g = p.add_argument_group("reference")
    g.add_argument("--ini_high", type=float, default=None, help="low-pass filter of the reference (Å; default 50)")
    g.add_argument("--firstiter_cc", action="store_true",
                   help="the reference is not on the particles' absolute greyscale (rescale it)")
    g.add_argument("--sym", dest="symmetry", default=None, help="point-group symmetry (default C1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iter", dest="n_iter", type=int, default=None,
                   help="maximum number of iterations (default 50; the last is the final one if not converged)")
    g.add_argument("--tau2_fudge", type=float, default=None, help="regularisation T (default 1)")
    g.add_argument("--particle_diameter", type=float, default=None, help="mask diameter (Å); default 0.8 × box")
    g.add_argument("--ctf", dest="do_ctf", action="store_true", default=None, help="do CTF correction")
    g.add_argument("--ctf_intact_first_peak", action="store_true", default=None,
                   help="ignore CTFs until their first peak")
    g.add_argument("--zero_mask", action="store_true", default=None, help="mask particles with zeros")
    g.add_argument("--flatten_solvent", action="store_true", default=None,
                   help="mask the references (with --solvent_mask or the particle sphere)")
    g.add_argument("--norm", dest="do_norm", action="store_true", default=None,
                   help="per-particle normalisation-error correction")
    g.add_argument("--scale", dest="do_scale", action="store_true", default=None,
                   help="per-group intensity-scale correction")
    g.add_argument("--low_resol_join_halves", type=float, default=None,
                   help="average the half-sets below this resolution (Å; default 40)")
    g.add_argument("--random_seed", type=int, default=None, help="random seed (default 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--healpix_order", type=int, default=None,
                   help="initial angular sampling, HEALPix order (default 2; 7.5° with --oversampling 1)")
    g.add_argument("--auto_local_healpix_order", type=int, default=None,
                   help="local searches from this HEALPix order on (default 4)")
    g.add_argument("--offset_range", type=float, default=None, help="translation search range (pixels, default 5)")
    g.add_argument("--offset_step", type=float, default=None,
                   help="translation step (pixels, before oversampling; default 1)")
    g.add_argument("--oversampling", type=int, default=None, help="adaptive oversampling order (default 1)")
    g.add_argument("--sigma_ang", type=float, default=None,
                   help="local angular searches from the start with this σ (degrees)")
    g.add_argument("--sigma_tilt", type=float, default=0.0,
                   help="tomographic particles: Gaussian prior (degrees) on the tilt angle in global searches, "
                        "centred on rlnAngleTiltPrior or the input tilt (orientations from surface normals)")
    g.add_argument("--sigma_psi", type=float, default=0.0,
                   help="tomographic particles: the same prior on the in-plane angle (rlnAnglePsiPrior)")
    g.add_argument("--auto_ignore_angles", action="store_true", default=None,
                   help="refine the sampling without waiting for the angles to settle")
    g.add_argument("--auto_resol_angles", action="store_true", default=None,
                   help="refine the sampling as soon as the resolution asks for it")
    g.add_argument("--finer_faster", action="store_true",
                   help="both --auto_ignore_angles and --auto_resol_angles (RELION GUI 'finer angular sampling "
                        "faster')")
    g.add_argument("--adaptive_fraction", type=float, default=None, help="posterior mass kept (default 0.999)")
    g.add_argument("--maxsig", dest="max_significant", type=int, default=None,
                   help="maximum significant coarse samples per particle (default 200; RELION: no limit; "
                        "the limit bounds the cost of the broad posteriors of the first iterations)")
    g.add_argument("--perturb", type=float, default=None, help="random perturbation of the grid (default 0.5)")
    g.add_argument("--incr_size", type=int, default=None, help="shells beyond the current resolution (default 10)")
    g.add_argument("--pad", type=int, default=None, help="padding factor of the Fourier interpolation (default 2)")
    g = p.add_argument_group("computation")
    g.add_argument("--j", type=int, default=None, help="CPU threads")
    g.add_argument("--batch_size", type=int, default=None, help="particles per batch (default 32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--alias", default=None, help="job alias (project jobs)")
    add_dask_arguments(g)
    # RELION options that cryopipe accepts and does not need
    for flag in ("--auto_refine", "--split_random_halves", "--dont_combine_weights_via_disc", "--cpu", "--gpu",
                 "--preread_images", "--no_parallel_disc_io", "--skip_gridding", "--pipeline_control",
                 "--scratch_dir"):
        g.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    g.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace, defaults: dict | None = None) -> tuple[Refine3DSettings, dict]:
    """``(settings, given)``: :class:`Refine3DSettings` from the parsed options (``defaults`` for those not
    given) and the fields given explicitly (they override stored ones when continuing)."""
    d = dict(DEFAULTS if defaults is None else defaults)
    names = {f.name for f in fields(Refine3DSettings)}
    given = {k: getattr(args, k) for k in d if k in names and getattr(args, k, None) is not None}
    if getattr(args, "finer_faster", False):
        given["auto_ignore_angles"] = given["auto_resol_angles"] = True
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(given)
    s = Refine3DSettings(**kw)
    if s.healpix_order < 0 or s.offset_step <= 0 or s.offset_range < 0 or s.oversampling < 0:
        raise CryopipeError("--healpix_order must be >= 0, --offset_step > 0, --offset_range >= 0, "
                            "--oversampling >= 0")
    if s.n_iter < 1:
        raise CryopipeError(f"--iter {s.n_iter}: need at least one iteration")
    return s, given


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log, progress
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.j:
        torch.set_num_threads(int(args.j))
    settings, given = settings_from_args(args)
    if args.continue_ is None and not args.i:
        raise CryopipeError("--i is required (particles STAR file or optimisation set), unless --continue is given")
    if args.continue_ is None and not args.ref and not (args.i and is_optimisation_set(args.i)):
        raise CryopipeError("--ref is required (the initial reference map, e.g. InitialModel/jobNNN/initial_model.mrc)")
    o = args.o
    if o is None and args.continue_ is not None:
        o = str(read_optimiser_star(args.continue_).get("rlnOutputRootName", "run"))
    out_dir, prefix = (None, "run") if o is None else split_output_prefix(o)
    same_job = args.continue_ is not None and out_dir is not None and \
        Path(args.continue_).resolve().parent == Path(out_dir).resolve()
    in_type = NodeType.TOMO_OPTIMISATION_SET if args.i and is_optimisation_set(args.i) else NodeType.PARTICLES
    if settings.solvent_correct_fsc and args.solvent_mask is None and args.continue_ is None and \
            in_type != NodeType.TOMO_OPTIMISATION_SET:
        raise CryopipeError("--solvent_correct_fsc needs a --solvent_mask (the mask the FSC is corrected for)")
    inputs = [(args.i, in_type), (args.ref, NodeType.DENSITY_MAP), (args.solvent_mask, NodeType.MASK3D)]
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(str(out_dir) + "/" if out_dir is not None else None, "Refine3D", ProcessLabel.REFINE3D,
                      alias=args.alias, inputs=inputs if args.continue_ is None else [], params=params,
                      continue_job=same_job) as job, job_backend(args, log) as backend:
        res = refine_3d(args.i, job.dir / prefix, settings, reference=args.ref, solvent_mask=args.solvent_mask,
                        absolute_greyscale=not args.firstiter_cc, continue_from=args.continue_, overrides=given,
                        device=args.device, root=job.root, command=" ".join(_argv_of(args)), log=log,
                        progress=lambda it, desc="": progress(it, desc=desc), tomograms=args.tomograms,
                        angle_sigmas=(float(args.sigma_tilt or 0.0), float(args.sigma_psi or 0.0)),
                        backend=backend)
        if res.converged:
            job.add_output(res.data_star, NodeType.REFINE3D_PARTICLES)
            job.add_output(res.optimiser_star, NodeType.REFINE3D_OPTIMISER)
            job.add_output(res.half_maps[0], NodeType.REFINE3D_HALFMAP)
            job.add_output(res.map, NodeType.REFINE3D_MAP)
            if res.optimisation_set is not None:
                job.add_output(res.optimisation_set, NodeType.TOMO_OPTIMISATION_SET)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `cryopipe refine3d`")

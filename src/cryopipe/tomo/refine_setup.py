"""Setting up a 3D refinement or initial model of tomographic particles (a particles file with rlnTomoName,
directly or through an optimisation set): 3D pseudo-subtomograms on
:class:`~cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D` or 2D stacks on
:class:`~cryopipe.engine.tomo_optimiser.StackOptimiser3D` (orientations and origins in the tomogram frame while
refining, written back in the subtomogram frame in RELION's tomography layout), new or continued from an
``_itNNN_optimiser.star``; optional priors on the subtomogram-frame tilt / psi (:mod:`cryopipe.engine.tomo_priors`).
Moved from ``jobs/refine3d.py`` (issue 14); behaviour unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryopipe.engine.class2d_files import project_relative as _rel
from cryopipe.engine.optimiser3d import ParticleState3D, Refine3DSettings
from cryopipe.engine.refine3d_files import (
    load_reference,
    model3d_from_files,
    original_sampling,
    restore_changes,
    sampling_from_files,
)
from cryopipe.engine.refine3d_setup import ContinuedRun, RefineInputs, RefineStart
from cryopipe.engine.relion_files import resolve_relion_path
from cryopipe.errors import InputFileError
from cryopipe.io.tomo_particles import is_optimisation_set, is_tomo_particles, optimisation_set_entries

__all__ = ["tomo_optimiser", "resume_tomo_refine3d", "start_tomo_refine3d", "tomo_inputs"]


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
                   angle_sigmas: tuple[float, ...] = (0.0, 0.0), resume=None):
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
    sig_rot = float(angle_sigmas[2]) if len(angle_sigmas) > 2 else 0.0
    if angle_sigmas[0] > 0 or angle_sigmas[1] > 0 or sig_rot > 0:
        from cryopipe.engine.tomo_priors import AnglePriors, prior_centres

        tilt_c, psi_c, rot_c = prior_centres(sv.particles.particles, with_rot=True, missing_as_nan=True)
        opt.angle_priors = AnglePriors(tilt_c, psi_c, float(angle_sigmas[0]), float(angle_sigmas[1]),
                                       frames=sv.A_sub if form == "2d" else None, rot=rot_c, sigma_rot=sig_rot,
                                       follow_current=True)
        log(f"priors on the subtomogram-frame angles in global searches: σ_tilt {angle_sigmas[0]:g}°, "
            f"σ_psi {angle_sigmas[1]:g}°, σ_rot {sig_rot:g}° (centres: rlnAngleTiltPrior / rlnAnglePsiPrior / "
            "rlnAngleRotPrior, else the current angles, as RELION)")
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



def resume_tomo_refine3d(run: ContinuedRun, s: Refine3DSettings, overrides: dict, solvent_mask, dev, root: Path,
                         progress, log, angle_sigmas: tuple[float, ...] = (0.0, 0.0)) -> RefineStart:
    """Continue a tomographic refinement from the run's last ``_data.star`` (tomography layout), the stored half
    models and sampling state; the optimisation set and tomograms it started from (``cryopipeInputOptimisationSet``,
    ``cryopipeTomogramsFile``); the mask given or stored."""
    vals, bases, data_path, model_paths, sv = run.vals, run.bases, run.data_path, run.model_paths, run.sampling_vals
    set_values = None
    start = int(vals.get("rlnCurrentIteration", 0))
    input_set = str(vals.get("cryopipeInputOptimisationSet", "None"))
    if input_set not in ("", "None"):
        set_values = optimisation_set_entries(resolve_relion_path(input_set, *bases))
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
        return model, sampling_from_files(vals, sv, run.model_general, ps.pixel_size), start

    opt, data, write_data, _ = tomo_optimiser(data_path, s, None, mask_path, dev, root, progress, log,
                                              tomo_path, angle_sigmas=angle_sigmas, resume=resume)
    ps = opt.p
    restore_changes(opt, vals)
    original = original_sampling(sv, opt.sampling, ps.pixel_size)
    log(f"continuing from {run.path} (iteration {start}, {ps.size} tomographic particles, HEALPix "
        f"order {opt.sampling.healpix_order}{', local searches' if opt.sampling.sigma_ang > 0 else ''})")
    return RefineStart(opt, data, write_data, original, mask_name, input_set, set_values)


def start_tomo_refine3d(inp: RefineInputs, s: Refine3DSettings, tomograms, dev, root: Path, progress, log,
                        angle_sigmas: tuple[float, ...] = (0.0, 0.0)) -> RefineStart:
    """A new tomographic refinement: the tomograms from ``tomograms`` or the optimisation set (2D stacks need
    them), the reference(s) and mask of ``inp``; a particles file without a set gets one (for the final
    ``_optimisation_set.star``)."""
    particles_path, set_values, set_bases = inp.particles_path, inp.set_values, inp.set_bases
    if set_values is None:
        set_values = {"rlnTomoParticlesFile": _rel(particles_path, root)}
        if tomograms is not None:
            set_values["rlnTomoTomogramsFile"] = _rel(Path(tomograms), root)
    ref_list = inp.reference if isinstance(inp.reference, list) else [inp.reference]
    tomo_path = tomograms
    if set_values.get("rlnTomoTomogramsFile") not in (None, "", "None") and tomo_path is None:
        tomo_path = resolve_relion_path(str(set_values["rlnTomoTomogramsFile"]), root,
                                        particles_path.resolve().parent, *set_bases)
    opt, data, write_data, mask_name = tomo_optimiser(particles_path, s, ref_list, inp.solvent_mask, dev, root,
                                                       progress, log, tomo_path, angle_sigmas=angle_sigmas)
    original = (int(s.healpix_order), float(s.offset_range), float(s.offset_step))
    return RefineStart(opt, data, write_data, original, mask_name, inp.input_set, set_values)


def tomo_inputs(path: Path, tomograms, root: Path):
    """``(particles path, tomograms path or None, optimisation-set entries)`` when ``path`` is an optimisation set
    or a tomography particles file; None for single particles."""
    values: dict = {}
    tomo_path = Path(tomograms) if tomograms is not None else None
    if is_optimisation_set(path):
        values = optimisation_set_entries(path)
        bases = [path.resolve().parent, path.resolve().parent.parent.parent]
        particles = resolve_relion_path(str(values["rlnTomoParticlesFile"]), root, *bases)
        if tomo_path is None and values.get("rlnTomoTomogramsFile") not in (None, "", "None"):
            tomo_path = resolve_relion_path(str(values["rlnTomoTomogramsFile"]), root, *bases)
    elif is_tomo_particles(path):
        particles = path
        values = {"rlnTomoParticlesFile": _rel(path, root)}
        if tomo_path is not None:
            values["rlnTomoTomogramsFile"] = _rel(tomo_path, root)
    else:
        return None
    return particles, tomo_path, values

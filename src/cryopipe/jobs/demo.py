"""``cryopipe demo``: simulate a small data set in a fresh project folder and run every job that exists.

Every step is a real ``cryopipe`` command (the same code path as the command line), run inside the project so
that ``default_pipeline.star`` records the whole workflow and the project opens in RELION. Each step is scored
against the simulator's ground truth, and a summary (printed, and ``demo_summary.json`` in the project) says
what was done and how well.

Steps so far:
1. ``simulate --what particles``: particle stack of PDB 3ENL (enolase) with CTF and noise, truth angles.
2. ``reconstruct --ctf`` from the true angles: FSC against the truth map (0.5 and 0.143 crossings).
3. ``simulate --what micrographs``: micrographs with particles at known positions, contamination blobs (by default
   the D2 tetramer of 3ENL, ``--sym C1`` for the monomer).
4. ``autopick --LoG``: Laplacian-of-Gaussian picking; precision / recall against the true coordinates.
5. ``extract``: boxes of the picks, normalised, contrast inverted.
6. ``class2d``: 2D classification of the LoG-picked particles.
7. ``select --classes --auto --recenter``: automatic class selection; re-centred averages become templates.
8. ``autopick --ref``: template picking with those class averages; precision / recall again (the tutorial's
   templates loop: it should beat LoG).
9. ``extract``: the template-picked particles, Fourier-rescaled to box 48 (4 Å/px) for the 3D steps.
10. ``initialmodel``: de novo 3D model (gradient-driven, random-blob start, run in C1; D2 axes found and applied).
11. ``refine3d``: gold-standard auto-refine from the initial model.
12. ``mask-create``: a soft solvent mask from the refined map.
13. ``postprocess``: masked, phase-randomisation-corrected FSC of the half maps, sharpening.
The 3D maps are compared with the truth after rigid alignment (the de novo frame and hand are arbitrary):
FSC 0.5 against the truth, and the gold-standard 0.143 resolution the job reports.

Tilt-series path (``--no_tomo`` skips it):
14. ``simulate --what tiltseries``: tilt series (41 tilts, ±60°, dose-symmetric, 3 e/Å² per tilt) of the D2
    assembly at random positions and orientations in a slab, RELION 5 files, truth particles.
15. ``reconstruct-tomogram``: bin-4 tomograms; the dark density near each true particle is centred on it (voxels).
16. ``subtomo``: pseudo-subtomograms of the particles (CTF·dose-premultiplied, with weights).
17. ``reconstruct-particle``: half maps from the tilt series at the particles' (true) poses with the subtomo
    job's optimisation set, D2 applied; FSC against the truth map and between the half maps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cryopipe.errors import CryopipeError
from cryopipe.sim.map_scores import aligned_fsc_summary as _aligned_fsc_summary  # also used by demo_tomo, tests

#: file in a demo project that allows a later demo to replace it (nothing else is ever deleted)
DEMO_MARKER = ".cryopipe_demo"

HELP = "simulate a small data set in a fresh project folder and run every job on it, scored against the truth"


@contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _run(argv: list[str], record: list[dict]) -> float:
    """Run one cryopipe command; raise if it fails. Returns its wall time (s)."""
    from cryopipe.cli import main as cli_main

    import sys

    print(f"\n$ cryopipe {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    saved, sys.argv = sys.argv, ["cryopipe", *argv]  # each job's note.txt / run.out records its own command
    try:
        rc = cli_main(argv)
    finally:
        sys.argv = saved
    dt = time.perf_counter() - t0
    record.append({"command": "cryopipe " + " ".join(argv), "seconds": round(dt, 2), "rc": rc})
    if rc != 0:
        raise CryopipeError(f"demo step failed (exit {rc}): cryopipe {' '.join(argv)}")
    return dt


def _fsc_summary(map_path: Path, truth_path: Path) -> dict:
    import torch

    from cryopipe.core.fsc import fsc, resolution_at
    from cryopipe.io.mrc import read_mrc

    rec, apix = read_mrc(map_path)
    truth, _ = read_mrc(truth_path)
    f = fsc(torch.from_numpy(rec), torch.from_numpy(truth))
    n = rec.shape[0]
    return {"pixel_size_A": apix, "box": n, "nyquist_A": 2 * apix,
            "fsc_truth_0.5_A": round(float(resolution_at(f, 0.5, apix, n)), 2),
            "fsc_truth_0.143_A": round(float(resolution_at(f, 0.143, apix, n)), 2)}


def _pick_summary(autopick_dir: Path, sim_dir: Path, diameter_A: float, apix: float) -> dict:
    from cryopipe.io.star import read_star
    from cryopipe.picking.evaluate import PickScore, score_picks

    truth_list = read_star(sim_dir / "coords_truth_list.star")["coordinate_files"]
    picks_list = read_star(autopick_dir / "autopick.star")["coordinate_files"]
    picked = dict(zip(picks_list["rlnMicrographName"], picks_list["rlnMicrographCoordinates"]))
    total = PickScore(0, 0, 0)
    for mic, coord_file in zip(truth_list["rlnMicrographName"], truth_list["rlnMicrographCoordinates"]):
        t = read_star(Path(coord_file))[""]
        truth_xy = t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        if mic in picked:
            p = read_star(Path(picked[mic]))[""]
            picks_xy = p[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) if len(p) else np.zeros((0, 2))
        else:
            picks_xy = np.zeros((0, 2))
        total = total + score_picks(picks_xy, truth_xy, 0.3 * diameter_A / apix)
    return total.as_dict()


def fresh_demo_project(root: Path, keep: bool) -> None:
    """Create ``root`` (replacing an earlier demo's folder unless ``keep``; never anything else)."""
    if root.exists() and not keep:
        if root == Path.cwd().resolve() or root in Path.cwd().resolve().parents:
            raise CryopipeError(f"{root}: refusing to replace the current directory; pass another --o")
        if not root.is_dir() or (any(root.iterdir()) and not (root / DEMO_MARKER).exists()):
            raise CryopipeError(f"{root}: exists and was not made by cryopipe demo; refusing to replace it (pass "
                                "another --o, or --keep to add the demo's jobs to it)")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("made by cryopipe demo: the demo may replace this folder\n")


def run_demo(out_dir: str | os.PathLike = "cryopipe_demo", *, n_particles: int = 3000, n_micrographs: int = 8,
             device: str | None = None, keep: bool = False, seed: int = 1, class2d_k: int = 6,
             class2d_iter: int = 15, n_per_mic: int = 40, initial_iter: int = 60, refine_iter: int = 12,
             do_3d: bool = True, sym: str = "D2", do_tomo: bool = True, n_tomograms: int = 2,
             particles_per_tomogram: int = 40) -> dict:
    """Run the demo in a fresh project ``out_dir`` (replaced unless ``keep``) and return the summary."""
    root = Path(out_dir).resolve()
    fresh_demo_project(root, keep)
    dev = ["--device", device] if device else []
    steps: list[dict] = []
    summary: dict = {"project": str(root)}
    t_start = time.perf_counter()
    # the micrographs hold 3ENL (C1: the monomer, ~75 Å) or its point-group assembly (e.g. D2, ~130 Å)
    monomer = sym.upper() == "C1"
    diameter = 75.0 if monomer else 130.0  # Å, for scoring picks
    log_min, log_max = ("60", "85") if monomer else ("100", "150")
    mask_diam = "100" if monomer else "150"  # class2d mask and template picking (Å)
    fom_threshold = "1.0" if monomer else "0.4"  # template-matching FOM threshold (tuned on the demo's data)
    with _chdir(root):
        # 1-2: particles with known angles -> reconstruction
        apix_p = 1.5
        _run(["simulate", "--what", "particles", "--o", "Simulate/job001/", "--n", str(n_particles), "--box", "64",
              "--angpix", str(apix_p), "--snr", "0.1", "--seed", str(seed)] + dev, steps)
        _run(["reconstruct", "--i", "Simulate/job001/particles_truth.star", "--o", "Reconstruct/job002/", "--ctf"]
             + dev, steps)
        summary["reconstruct"] = {"n_particles": n_particles, "snr": 0.1,
                                  **_fsc_summary(Path("Reconstruct/job002/reconstruct.mrc"),
                                                 Path("Simulate/job001/truth_map.mrc"))}
        # 3-5: micrographs -> LoG picking -> extraction
        apix_m = 3.0
        _run(["simulate", "--what", "micrographs", "--o", "Simulate/job003/", "--n", str(n_micrographs),
              "--angpix", str(apix_m), "--mic_size", "1024", "--n_per_mic", str(n_per_mic), "--snr", "0.5",
              "--n_blobs", "1", "--seed", str(seed + 1), "--sym", sym] + dev, steps)
        _run(["autopick", "--i", "Simulate/job003/micrographs.star", "--odir", "AutoPick/job004/", "--LoG",
              "--LoG_diam_min", log_min, "--LoG_diam_max", log_max, "--shrink", "0", "--lowpass", "20",
              "--LoG_adjust_threshold", "3"] + dev, steps)
        summary["autopick_log"] = _pick_summary(Path("AutoPick/job004"), Path("Simulate/job003"), diameter, apix_m)
        _run(["extract", "--i", "Simulate/job003/micrographs.star", "--coord_list", "AutoPick/job004/autopick.star",
              "--o", "Extract/job005/", "--extract_size", "64", "--norm", "--invert_contrast"] + dev, steps)
        from cryopipe.io.particles import read_particles

        summary["extract"] = {"n_particles": len(read_particles(Path("Extract/job005/particles.star")))}
        # 6-9: the templates loop: 2D classes of the LoG picks -> automatic selection -> template picking
        _run(["class2d", "--i", "Extract/job005/particles.star", "--o", "Class2D/job006/", "--K", str(class2d_k),
              "--iter", str(class2d_iter), "--tau2_fudge", "2", "--particle_diameter", mask_diam, "--ctf", "--zero_mask",
              "--random_seed", str(seed)] + dev, steps)
        last = f"Class2D/job006/run_it{class2d_iter:03d}_optimiser.star"
        _run(["select", "--classes", "--i", last, "--o", "Select/job007/", "--auto", "--recenter"], steps)
        _run(["autopick", "--i", "Simulate/job003/micrographs.star", "--odir", "AutoPick/job008/", "--ref",
              "Select/job007/class_averages.star", "--invert", "--ctf", "--ang", "10", "--lowpass", "20", "--shrink", "0",
              "--particle_diameter", "85" if monomer else mask_diam, "--threshold", fom_threshold] + dev, steps)
        summary["autopick_template"] = _pick_summary(Path("AutoPick/job008"), Path("Simulate/job003"), diameter, apix_m)
        _run(["extract", "--i", "Simulate/job003/micrographs.star", "--coord_list", "AutoPick/job008/autopick.star",
              "--o", "Extract/job009/", "--extract_size", "64", "--scale", "48", "--norm", "--invert_contrast"]
             + dev, steps)
        summary["extract_template"] = {"n_particles": len(read_particles(Path("Extract/job009/particles.star")))}
        if do_3d:
            _run_3d(summary, steps, dev, seed, initial_iter, refine_iter, sym, "110" if monomer else mask_diam)
        if do_tomo:
            _run_tiltseries(summary, steps, dev, seed, n_tomograms, particles_per_tomogram)
    summary["steps"] = steps
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    from cryopipe.io.atomic import atomic_path

    with atomic_path(root / "demo_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary


def _run_3d(summary: dict, steps: list[dict], dev: list[str], seed: int, initial_iter: int, refine_iter: int,
            sym: str, diam: str) -> None:
    """Steps 10-13 (inside the project): initial model → refine → mask → postprocess, scored against the truth."""
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    truth = Path("Simulate/job003/truth_map.mrc")
    _run(["initialmodel", "--i", "Extract/job009/particles.star", "--o", "InitialModel/job010/", "--iter",
          str(initial_iter), "--particle_diameter", diam, "--sym", sym, "--ctf", "--healpix_order", "1",
          "--offset_range", "4", "--offset_step", "2", "--random_seed", str(seed)] + dev, steps)
    summary["initialmodel"] = _aligned_fsc_summary(Path("InitialModel/job010/initial_model.mrc"), truth, sym)
    summary["initialmodel"]["symmetry"] = sym
    _run(["refine3d", "--i", "Extract/job009/particles.star", "--o", "Refine3D/job011/", "--ref",
          "InitialModel/job010/initial_model.mrc", "--ini_high", "30", "--particle_diameter", diam, "--ctf",
          "--sym", sym, "--iter", str(refine_iter), "--random_seed", str(seed)] + dev, steps)
    summary["refine3d"] = _aligned_fsc_summary(Path("Refine3D/job011/run_class001.mrc"), truth, sym)
    general = read_star(Path("Refine3D/job011/run_model.star"))["model_general"]
    summary["refine3d"]["reported_resolution_A"] = float(general["rlnCurrentResolution"])
    vol, _ = read_mrc(Path("Refine3D/job011/run_class001.mrc"))
    thr = 0.15 * float(vol.max())  # the demo's automatic threshold: 15 % of the map maximum
    _run(["mask-create", "--i", "Refine3D/job011/run_class001.mrc", "--o", "MaskCreate/job012/", "--lowpass", "15",
          "--ini_threshold", f"{thr:.6g}", "--extend_inimask", "2", "--width_soft_edge", "4"] + dev, steps)
    _run(["postprocess", "--i", "Refine3D/job011/run_half1_class001_unfil.mrc", "--mask", "MaskCreate/job012/mask.mrc",
          "--o", "PostProcess/job013/", "--auto_bfac", "--autob_lowres", "15"] + dev, steps)
    pp = read_star(Path("PostProcess/job013/postprocess.star"))["general"]
    summary["postprocess"] = {"resolution_0.143_A": float(pp["rlnFinalResolution"]),
                              "bfactor": float(pp.get("rlnBfactorUsedForSharpening", float("nan"))),
                              **_aligned_fsc_summary(Path("PostProcess/job013/postprocess_masked.mrc"), truth)}


def _run_tiltseries(summary: dict, steps: list[dict], dev: list[str], seed: int, n_tomograms: int,
                    particles_per_tomogram: int) -> None:
    """Steps 14-17 (inside the project): simulate tilt series → tomograms → pseudo-subtomograms → particle
    reconstruction, scored against the truth. Job numbers follow the jobs already run (one per step)."""
    import torch

    from cryopipe.core.fsc import fsc, resolution_at
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star
    from cryopipe.io.tomo_particles import read_tomo_particles
    from cryopipe.io.tomography import read_tomograms
    from cryopipe.tomo.evaluate import position_errors

    def job(type_dir: str) -> str:
        return f"{type_dir}/job{len(steps) + 1:03d}/"

    sim = job("Simulate")
    _run(["simulate", "--what", "tiltseries", "--o", sim, "--n_tomograms", str(n_tomograms),
          "--particles_per_tomogram", str(particles_per_tomogram), "--sym", "D2", "--tilt_range", "-60", "60",
          "--tilt_step", "3", "--dose_per_tilt", "3", "--seed", str(seed + 2)] + dev, steps)
    truth_sets = read_tomograms(Path(sim) / "truth" / "tomograms.star")
    truth = read_tomo_particles(Path(sim) / "truth" / "particles.star", truth_sets)
    n_particles = len(truth)
    truth_map = Path(sim) / "truth" / "truth_map.mrc"
    apix_t = read_mrc(truth_map)[1]
    binning = 4
    tomo = job("Tomograms")
    _run(["reconstruct-tomogram", "--t", f"{sim}tomograms.star", "--o", tomo, "--bin", str(binning)] + dev, steps)
    positions = truth.positions_px(truth_sets)
    errors = []
    for name in truth_sets.names:
        volume, _ = read_mrc(Path(tomo) / "tomograms" / f"rec_{name}.mrc")
        rows = truth.tomo_names == name
        errors.append(position_errors(torch.from_numpy(volume), torch.from_numpy(positions[rows]), binning))
    errors = torch.cat(errors)
    summary["reconstruct_tomogram"] = {"binning": binning, "n_particles": n_particles,
                                       "position_error_median_voxels": round(float(errors.nanmedian()), 3),
                                       "position_error_max_voxels": round(float(errors.nan_to_num(99.0).max()), 3)}
    sub = job("PseudoSubtomo")
    _run(["subtomo", "--i", f"{sim}optimisation_set.star", "--o", sub, "--b", "48", "--crop", "32", "--bin", "1"]
         + dev, steps)
    table = read_star(Path(sub) / "particles.star")["particles"]
    written = sum(Path(name).exists() for name in table["rlnImageName"])
    summary["subtomo"] = {"n_particles": len(table), "n_written": int(written), "box": 32, "pixel_size_A": apix_t}
    rec = job("ReconstructParticleTomo")
    box = read_mrc(truth_map)[0].shape[-1]
    _run(["reconstruct-particle", "--i", f"{sub}optimisation_set.star", "--o", rec, "--b", str(box + box % 2 + 6),
          "--crop", str(box + box % 2), "--bin", "1", "--sym", "D2"] + dev, steps)
    half1, apix = read_mrc(Path(rec) / "half1.mrc")
    half2, _ = read_mrc(Path(rec) / "half2.mrc")
    gold = fsc(torch.from_numpy(half1), torch.from_numpy(half2))
    summary["reconstruct_particle"] = {
        "n_particles": n_particles, **_fsc_summary(Path(rec) / "merged.mrc", truth_map),
        "half_maps_0.143_A": round(float(resolution_at(gold, 0.143, apix, half1.shape[-1])), 2)}


def _print_summary(s: dict) -> None:
    r = s["reconstruct"]
    a = s["autopick_log"]
    print("\n================ cryopipe demo: results ================")
    print(f"project: {s['project']}  (open it in RELION: default_pipeline.star)")
    print(f"reconstruct  {r['n_particles']} particles, SNR {r['snr']}, box {r['box']}, {r['pixel_size_A']} Å/px: "
          f"FSC vs truth = 0.5 at {r['fsc_truth_0.5_A']} Å, 0.143 at {r['fsc_truth_0.143_A']} Å "
          f"(Nyquist {r['nyquist_A']} Å)")
    print(f"autopick LoG precision {a['precision']:.3f}, recall {a['recall']:.3f}, F1 {a['f1']:.3f} "
          f"({a['n_matched']} of {a['n_true']} true particles, {a['n_picks']} picks)")
    print(f"extract      {s['extract']['n_particles']} particles")
    t = s.get("autopick_template")
    if t:
        print(f"templates loop: class2d -> select (auto) -> autopick --ref: precision {t['precision']:.3f}, "
              f"recall {t['recall']:.3f}, F1 {t['f1']:.3f} (LoG F1 {a['f1']:.3f}); "
              f"{s['extract_template']['n_particles']} particles extracted")
    if "refine3d" in s:
        im, rf, pp = s["initialmodel"], s["refine3d"], s["postprocess"]
        axes = (f"; {im['symmetry']} axes within {im['symmetry_axes_error_deg']}° of the truth's"
                if "symmetry_axes_error_deg" in im else "")
        how = "C1" if im["symmetry"].upper() == "C1" else f"run in C1, {im['symmetry']} found and applied"
        print(f"initial model (de novo, {how}): FSC vs truth "
              f"(aligned{', hand flipped' if im['hand_flipped'] else ''}) = 0.5 at {im['fsc_truth_0.5_A']} Å{axes}")
        print(f"refine3d     gold-standard resolution {rf['reported_resolution_A']:.2f} Å; FSC vs truth = 0.5 at "
              f"{rf['fsc_truth_0.5_A']} Å ({rf['pixel_size_A']:.2f} Å/px, Nyquist {2 * rf['pixel_size_A']:.2f} Å)")
        print(f"postprocess  masked gold-standard FSC 0.143 at {pp['resolution_0.143_A']:.2f} Å, B {pp['bfactor']:.1f} Å²;"
              f" sharpened map vs truth = 0.5 at {pp['fsc_truth_0.5_A']} Å")
    if "reconstruct_particle" in s:
        t, st, rp = s["reconstruct_tomogram"], s["subtomo"], s["reconstruct_particle"]
        print(f"tilt series  {rp['n_particles']} particles (D2) in simulated tilt series (41 tilts ±60°, 3 e/Å² each)")
        print(f"reconstruct-tomogram bin {t['binning']}: particle density centred on the true positions to "
              f"{t['position_error_median_voxels']} voxels (median; max {t['position_error_max_voxels']})")
        print(f"subtomo      {st['n_written']} of {st['n_particles']} pseudo-subtomograms written "
              f"({st['box']}³ at {st['pixel_size_A']} Å/px)")
        print(f"reconstruct-particle (true poses): FSC vs truth = 0.5 at {rp['fsc_truth_0.5_A']} Å, half maps "
              f"0.143 at {rp['half_maps_0.143_A']} Å ({rp['pixel_size_A']} Å/px, Nyquist {rp['nyquist_A']} Å)")
    for st in s["steps"]:
        print(f"  {st['seconds']:7.1f} s  {st['command']}")
    print(f"total {s['total_seconds']:.1f} s; summary in {s['project']}/demo_summary.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--o", dest="output", default="cryopipe_demo", help="project folder to create (replaced if it exists)")
    p.add_argument("--n_particles", type=int, default=3000, help="simulated particles for the reconstruction")
    p.add_argument("--n_micrographs", type=int, default=8, help="simulated micrographs for picking")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulated data")
    p.add_argument("--class2d_K", dest="class2d_k", type=int, default=6, help="2D classes in the templates loop")
    p.add_argument("--class2d_iter", type=int, default=15, help="2D classification iterations")
    p.add_argument("--n_per_mic", type=int, default=40, help="simulated particles per micrograph")
    p.add_argument("--initial_iter", type=int, default=60, help="initial-model iterations")
    p.add_argument("--refine_iter", type=int, default=12, help="maximum refine3d iterations")
    p.add_argument("--sym", default="D2",
                   help="point group of the simulated particles: 3ENL's D2 assembly (default) or C1 (the monomer)")
    p.add_argument("--no_3d", action="store_true", help="stop after the templates loop (no 3D steps)")
    p.add_argument("--no_tomo", action="store_true", help="skip the tilt-series path (steps 14-17)")
    p.add_argument("--n_tomograms", type=int, default=2, help="simulated tilt series in the tilt-series path")
    p.add_argument("--particles_per_tomogram", type=int, default=40, help="particles per simulated tomogram")
    p.add_argument("--tomo", action="store_true", help="only the subtomogram-averaging path (C6 lattice; demo_tomo)")
    p.add_argument("--keep", action="store_true", help="do not replace an existing project folder (adds jobs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    if args.tomo:  # the subtomogram-averaging tutorial path only
        from cryopipe.jobs.demo_tomo import main_tomo
        return main_tomo(args)
    s = run_demo(args.output, n_particles=args.n_particles, n_micrographs=args.n_micrographs, device=args.device,
                 keep=args.keep, seed=args.seed, class2d_k=args.class2d_k, class2d_iter=args.class2d_iter,
                 n_per_mic=args.n_per_mic, initial_iter=args.initial_iter, refine_iter=args.refine_iter,
                 do_3d=not args.no_3d, sym=args.sym, do_tomo=not args.no_tomo, n_tomograms=args.n_tomograms,
                 particles_per_tomogram=args.particles_per_tomogram)
    _print_summary(s)
    return 0

"""``cryopipe select --classes``: selection by number / automatic score, sorting, re-centring, regrouping,
class_averages.star / .mrcs and the PNG gallery, on RELION's class2d fixture (K=4, 430/97/52/21 particles in
classes 2/4/1/3) and on hand-made runs with known good and junk classes."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryopipe.core.fourier import irfft2_centered, radius_2d, rfft2_centered, shift_images
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import MrcStack, parse_image_name, read_mrc, write_mrc
from cryopipe.io.star import read_star, read_star_with_version, write_star
from cryopipe.selection.classes import (
    SORT_DIRECTIONS,
    auto_select,
    center_of_mass,
    parse_class_numbers,
    recenter_images,
    regroup_particles,
    sort_order,
)
from cryopipe.selection.files import find_class2d_run, select_classes
from cryopipe.selection.gallery import write_class_gallery

FIXTURE_COUNTS = {1: 52, 2: 430, 3: 21, 4: 97}


@pytest.fixture(scope="module")
def c2d(relion_dir) -> Path:
    return relion_dir / "class2d"


def _run_cli(argv: list[str]) -> int:
    from cryopipe.jobs import select

    p = argparse.ArgumentParser()
    select.add_arguments(p)
    return select.main(p.parse_args(argv))


def _com_numpy(img: np.ndarray, ring: tuple[float, float]) -> tuple[float, float]:
    """Independent centre of mass of the positive density above the median of a ring about N//2."""
    n = img.shape[0]
    y, x = np.mgrid[:n, :n].astype(np.float64)
    r = np.hypot(x - n // 2, y - n // 2)
    bg = np.median(img[(r >= ring[0]) & (r <= ring[1])])
    w = np.clip(img.astype(np.float64) - bg, 0, None)
    return float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())


# ------------------------------------------------------------------------------------------------ RELION fixture


@pytest.mark.parametrize("which", ["optimiser", "model", "data"])
def test_select_by_number_particle_counts(c2d, tmp_path, which):
    inp = c2d / f"run_it005_{which}.star"
    for spec, expected in (("2", 430), ("1,3", 73), ("2,4", 527), ("1-4", 600)):
        out = tmp_path / spec.replace(",", "_")
        res = select_classes(inp, out, select=spec, root=tmp_path, gallery=False)
        assert res.n_particles_in == 600
        assert res.n_particles_selected == expected
        blocks, version = read_star_with_version(out / "particles.star")
        assert version == 50001 and list(blocks) == ["optics", "particles"]
        parts = blocks["particles"]
        assert len(parts) == expected
        wanted = parse_class_numbers(spec)
        assert set(parts["rlnClassNumber"]) == set(wanted)
        # input order kept, optics table unchanged
        src = read_star(c2d / "run_it005_data.star")
        order = src["particles"].index[src["particles"]["rlnClassNumber"].isin(wanted)]
        np.testing.assert_allclose(parts["rlnDefocusU"], src["particles"].loc[order, "rlnDefocusU"])
        pd.testing.assert_frame_equal(blocks["optics"], src["optics"])
        # image names valid from the project root (the fixture lies outside it: absolute names)
        idx, f = parse_image_name(parts["rlnImageName"].iloc[0])
        assert Path(f).is_absolute() and Path(f).exists()
        # backup_selection: rlnSelected per class in class order
        sel = read_star(out / "backup_selection.star")[""]["rlnSelected"].tolist()
        assert sel == [int(k in wanted) for k in range(1, 5)]


def test_sort_orders_and_class_averages_star(c2d, tmp_path):
    expect = {
        "rlnClassDistribution": [2, 4, 1, 3],          # 0.671, 0.178, 0.117, 0.035
        "rlnAccuracyRotations": [1, 3, 2, 4],          # 27.1, 28.1, 28.6, 29.1 (best first)
        "rlnEstimatedResolution": [2, 1, 4, 3],        # 24, 28.8, 28.8 (table order), 36
        "rlnClassNumber": [1, 2, 3, 4],
    }
    run = find_class2d_run(c2d / "run_it005_model.star")
    for key, want in expect.items():
        assert (sort_order(run.classes, key) + 1).tolist() == want
        assert (sort_order(run.classes, key, reverse=True) + 1).tolist() == want[::-1]
    out = tmp_path / "acc"
    res = select_classes(c2d / "run_it005_model.star", out, select="1,2,4", sort_by="rlnAccuracyRotations",
                         root=tmp_path, gallery=False)
    assert res.selected == [1, 2, 4]
    ca = read_star(out / "class_averages.star")[""]
    assert ca["rlnClassNumber"].tolist() == [1, 2, 4]
    np.testing.assert_allclose(ca["rlnAccuracyRotations"], [27.1, 28.6, 29.1])
    res = select_classes(c2d / "run_it005_model.star", tmp_path / "dist", select="1,2,4", root=tmp_path,
                         gallery=False)   # default: rlnClassDistribution, largest first
    assert read_star(tmp_path / "dist" / "class_averages.star")[""]["rlnClassNumber"].tolist() == [2, 4, 1]
    with pytest.raises(CryopipeError, match="sort_by"):
        sort_order(run.classes, "rlnNotALabel")
    from cryopipe.jobs.select_classes import SORT_KEYS

    assert set(SORT_KEYS) == set(SORT_DIRECTIONS)


def test_class_averages_star_points_at_real_images(c2d, tmp_path):
    cls, _ = read_mrc(c2d / "run_it005_classes.mrcs")
    res = select_classes(c2d / "run_it005_optimiser.star", tmp_path / "sel", select="3,1", root=tmp_path,
                         sort_by="rlnClassNumber")
    blocks, version = read_star_with_version(res.class_averages_star)
    assert version == 50001
    table = blocks[""]
    assert table["rlnClassNumber"].tolist() == [1, 3]
    for name, k in zip(table["rlnReferenceImage"], table["rlnClassNumber"]):
        idx, f = parse_image_name(name)
        path = Path(f) if Path(f).is_absolute() else tmp_path / f
        with MrcStack(path) as st:
            np.testing.assert_array_equal(st[idx], cls[k - 1])
    # usable as template-picking references
    from cryopipe.picking.template import read_reference_images

    refs, apix, _, is3d = read_reference_images(res.class_averages_star, root=tmp_path)
    assert refs.shape == (2, 48, 48) and apix == 3.0 and not is3d


def test_recenter_fixture_classes(c2d, tmp_path):
    """Class 1 of the fixture has its white density ~3 px below the centre; --recenter brings it to N//2."""
    cls, _ = read_mrc(c2d / "run_it005_classes.mrcs")
    ring = (0.8 * 65.0 / 3.0, 65.0 / 3.0)                   # particle diameter 130 Å in the optimiser
    before = [_com_numpy(im, ring) for im in cls]
    assert abs(before[0][1] - 24) > 2.0                      # class 1 is off-centre in y
    res = select_classes(c2d / "run_it005_optimiser.star", tmp_path / "rc", select="1,2,3,4", recenter=True,
                         root=tmp_path, gallery=False)
    table = read_star(res.class_averages_star)[""]
    assert all(n.endswith("@rc/class_averages.mrcs") for n in table["rlnReferenceImage"])
    stack, apix = read_mrc(tmp_path / "rc" / "class_averages.mrcs")
    assert stack.shape == (4, 48, 48) and apix == 3.0
    for img, k, shift in zip(stack, table["rlnClassNumber"], res.recenter_shifts):
        cx, cy = _com_numpy(img, ring)
        assert abs(cx - 24) < 0.5 and abs(cy - 24) < 0.5, (k, cx, cy)
        bx, by = before[k - 1]
        np.testing.assert_allclose(shift, [24 - bx, 24 - by], atol=0.3)


def test_recenter_synthetic_offcentre_and_centred():
    n = 64
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    # asymmetric off-centre object (two lobes) centred at (41.3, 20.6); a symmetric one exactly at N//2
    off = (torch.exp(-((x - 39.3) ** 2 + (y - 20.6) ** 2) / 18) + torch.exp(-((x - 45.3) ** 2 + (y - 20.6) ** 2) / 18))
    cen = torch.exp(-((x - 32) ** 2 + (y - 32) ** 2) / 30)
    imgs = torch.stack([off, cen]).float()
    com0 = center_of_mass(imgs)
    np.testing.assert_allclose(com0[0].numpy(), [42.3, 20.6], atol=0.02)
    out, shifts = recenter_images(imgs)
    for img in out.numpy():
        cx, cy = _com_numpy(img, (0.8 * 31, 31))
        assert abs(cx - 32) < 0.5 and abs(cy - 32) < 0.5
    np.testing.assert_allclose(shifts[0].numpy(), [32 - 42.3, 32 - 20.6], atol=0.05)
    assert float(shifts[1].abs().max()) < 1e-3
    assert float((out[1] - imgs[1]).abs().max()) < 1e-4 * float(imgs[1].max())
    # the peak of the two-lobe object moved with it (shape kept, sub-pixel shift)
    assert abs(float((out[0] * x).sum() / out[0].sum()) - 32) < 0.1


def test_recenter_ignores_a_neighbour_in_the_box():
    """Crowded box (issue 11): a particle 3 px off-centre and a neighbour of the same size ~27 px away at the box
    edge. The whole-box centre of mass is pulled several px towards the neighbour; the iterated centre of mass
    inside the soft particle mask puts the particle itself on the box centre."""
    n, radius = 64, 12.0
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")

    def blob(cx, cy):   # two lobes and a smaller third (asymmetric, ~20 px across), placed at (cx, cy)
        return (torch.exp(-((x - cx + 3) ** 2 + (y - cy) ** 2) / 14)
                + torch.exp(-((x - cx - 3) ** 2 + (y - cy) ** 2) / 14)
                + 0.6 * torch.exp(-((x - cx) ** 2 + (y - cy - 4) ** 2) / 10))

    particle = blob(34.5, 30.0)
    neighbour = blob(34.5 + 25.0, 30.0 - 12.0)
    noise = 0.02 * torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    img = (particle + neighbour + noise)[None].float()
    true_com = np.array([float((particle * x).sum() / particle.sum()), float((particle * y).sum() / particle.sum())])
    pulled = center_of_mass(img, radius)[0].numpy() - true_com
    assert np.hypot(*pulled) > 3.0                          # the whole-box centre of mass is pulled off
    out, shifts = recenter_images(img, radius)
    np.testing.assert_allclose(shifts[0].numpy(), 32.0 - true_com, atol=0.4)
    moved = shift_images(particle[None], shifts)[0]        # the particle alone, moved by the shift applied
    cx, cy = float((moved * x).sum() / moved.sum()), float((moved * y).sum() / moved.sum())
    assert abs(cx - 32) < 0.4 and abs(cy - 32) < 0.4, (cx, cy)
    # the particle alone gets the same shift (the neighbour no longer matters)
    _, alone = recenter_images(particle[None].float(), radius)
    np.testing.assert_allclose(alone[0].numpy(), shifts[0].numpy(), atol=0.2)


# ------------------------------------------------------------------------------------------------ regrouping


def test_regroup_fixture_particles_by_defocus(c2d, tmp_path):
    n_groups = 5
    res = select_classes(c2d / "run_it005_data.star", tmp_path / "rg", select="2,4", regroup=n_groups,
                         root=tmp_path, gallery=False)
    parts = read_star(tmp_path / "rg" / "particles.star")["particles"]
    assert len(parts) == 527
    sizes = parts["rlnGroupNumber"].value_counts().sort_index()
    assert res.n_groups == len(sizes) <= n_groups
    assert sizes.min() >= 527 // n_groups
    assert sorted(set(parts["rlnGroupName"])) == [f"group_{g}" for g in sizes.index]
    assert (parts["rlnGroupName"] == parts["rlnGroupNumber"].map(lambda g: f"group_{g}")).all()
    # groups follow the defocus: no overlap between consecutive groups
    dz = 0.5 * (parts["rlnDefocusU"] + parts["rlnDefocusV"])
    lo, hi = dz.groupby(parts["rlnGroupNumber"]).min(), dz.groupby(parts["rlnGroupNumber"]).max()
    assert (hi.to_numpy()[:-1] <= lo.to_numpy()[1:]).all()
    with pytest.raises(CryopipeError, match="at least 10"):
        select_classes(c2d / "run_it005_data.star", tmp_path / "rg2", select="2,4", regroup=100, root=tmp_path)


def test_regroup_keeps_micrographs_and_optics_groups():
    rng = np.random.default_rng(3)
    rows = []
    for m in range(40):
        for _ in range(int(rng.integers(1, 15))):
            rows.append({"rlnMicrographName": f"mic{m:03d}.mrc", "rlnOpticsGroup": 1 + (m >= 25),
                         "rlnDefocusU": 8000.0 + 500 * ((m * 7) % 40) + rng.normal(0, 50),
                         "rlnDefocusV": 8000.0 + 500 * ((m * 7) % 40), "rlnGroupNumber": m + 1})
    parts = pd.DataFrame(rows)
    n = len(parts)
    for n_groups in (3, 6, 12):
        out = regroup_particles(parts, n_groups)
        target = n // n_groups
        assert len(out) == n and (out.index == parts.index).all()
        sizes = out["rlnGroupNumber"].value_counts()
        assert len(sizes) <= n // target
        assert sizes.min() >= target
        # a micrograph is never split and a group never mixes optics groups
        assert (out.groupby("rlnMicrographName")["rlnGroupNumber"].nunique() == 1).all()
        assert (out.groupby("rlnGroupNumber")["rlnOpticsGroup"].nunique() == 1).all()
        # within an optics group, groups are ordered by the micrographs' mean defocus
        mic_dz = out.groupby("rlnMicrographName").apply(
            lambda d: pd.Series({"dz": (0.5 * (d.rlnDefocusU + d.rlnDefocusV)).mean(), "g": d.rlnGroupNumber.iloc[0],
                                 "o": d.rlnOpticsGroup.iloc[0]}), include_groups=False)
        for _, d in mic_dz.groupby("o"):
            d = d.sort_values("dz")
            assert (np.diff(d["g"].to_numpy()) >= 0).all()
    # RELION 5 rule: old groups ordered by their scale correction
    scales = {g: float(s) for g, s in zip(range(1, 41), rng.permutation(40) / 40 + 0.5)}
    out = regroup_particles(parts, 4, by="scale", group_scales=scales)
    assert (out.groupby("rlnGroupNumber")["rlnOpticsGroup"].nunique() == 1).all()
    old_scale = parts["rlnGroupNumber"].map(scales)
    for og in (1, 2):
        sel = out["rlnOpticsGroup"] == og
        g_lo = old_scale[sel].groupby(out.loc[sel, "rlnGroupNumber"]).min().to_numpy()
        g_hi = old_scale[sel].groupby(out.loc[sel, "rlnGroupNumber"]).max().to_numpy()
        assert (g_hi[:-1] <= g_lo[1:]).all()
    with pytest.raises(CryopipeError, match="data_model_groups"):
        regroup_particles(parts, 4, by="scale", group_scales=None)


# ------------------------------------------------------------------------------------------------ auto selection


def _lowpass(img: torch.Tensor, res_A: float, apix: float) -> torch.Tensor:
    n = img.shape[-1]
    k = radius_2d(n, dtype=torch.float64) / (n * apix)
    return irfft2_centered(rfft2_centered(img) * torch.exp(-0.5 * (k * res_A / 1.2) ** 2), n)


def _synthetic_run(relion_dir: Path, folder: Path) -> dict[str, list[int]]:
    """A hand-made Class2D run: 3 good classes (projections of the reference map at ~20 Å), an average of
    empty-ice noise, a Gaussian blob and an ice ball (disc) - the blob with the *best* metadata of all."""
    apix, n = 3.0, 48
    proj, _ = read_mrc(relion_dir / "proj_noctf.mrcs")
    g = torch.Generator().manual_seed(5)
    c = torch.arange(n, dtype=torch.float64) - n // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    mask = 0.5 + 0.5 * torch.cos(math.pi * ((r - 19) / 4).clamp(0, 1))

    def noise(level):
        return level * _lowpass(torch.randn(n, n, generator=g, dtype=torch.float64), 20, apix)

    good = [_lowpass(torch.from_numpy(proj[i]).double(), 20, apix) for i in (0, 3, 7)]
    scale = float(max(im.max() for im in good))
    imgs = [im + noise(0.02 * scale) for im in good]
    imgs.append(noise(0.15 * scale))                                               # empty ice
    imgs.append(scale * torch.exp(-r ** 2 / (2 * 5.0 ** 2)) + noise(0.02 * scale))  # blob
    imgs.append(0.6 * scale * _lowpass((r < 11).double(), 20, apix) + noise(0.02 * scale))  # ice ball
    stack = (torch.stack(imgs) * mask).float().numpy()
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "run_it025_classes.mrcs", stack, apix)
    #            good1  good2  good3  noise  blob   disc
    dist = [0.20, 0.18, 0.15, 0.12, 0.25, 0.10]
    res = [20.0, 21.0, 22.0, 40.0, 19.0, 23.0]
    acc_rot = [6.0, 7.0, 8.0, 45.0, 5.5, 9.0]
    acc_tr = [1.5, 1.6, 1.8, 6.0, 1.2, 2.0]
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{k:06d}@{folder.name}/run_it025_classes.mrcs" for k in range(1, 7)],
        "rlnClassDistribution": dist, "rlnAccuracyRotations": acc_rot, "rlnAccuracyTranslationsAngst": acc_tr,
        "rlnEstimatedResolution": res, "rlnOverallFourierCompleteness": [1.0] * 6,
        "rlnClassPriorOffsetX": [0.0] * 6, "rlnClassPriorOffsetY": [0.0] * 6})
    general = {"rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2, "rlnOriginalImageSize": n,
               "rlnCurrentResolution": 20.0, "rlnPixelSize": apix, "rlnNrClasses": 6, "rlnNrGroups": 1}
    groups = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group_1"], "rlnGroupNrParticles": [1000],
                           "rlnGroupScaleCorrection": [1.0]})
    write_star(folder / "run_it025_model.star", {"model_general": general, "model_classes": classes,
                                                 "model_groups": groups}, version=50001)
    counts = [round(d * 1000) for d in dist]
    cls = np.repeat(np.arange(1, 7), counts)
    np.random.default_rng(0).shuffle(cls)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [n], "rlnImageDimensionality": [2]})
    m = len(cls)
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Extract/job004/particles.mrcs" for i in range(m)],
                          "rlnMicrographName": [f"mic{i % 50:03d}.mrc" for i in range(m)],
                          "rlnOpticsGroup": 1, "rlnDefocusU": 10000.0 + 100.0 * (np.arange(m) % 50),
                          "rlnDefocusV": 10000.0 + 100.0 * (np.arange(m) % 50), "rlnGroupNumber": 1,
                          "rlnClassNumber": cls})
    write_star(folder / "run_it025_data.star", {"optics": optics, "particles": parts}, version=50001)
    write_star(folder / "run_it025_optimiser.star", {"optimiser_general": {
        "rlnOutputRootName": f"{folder.name}/run", "rlnModelStarFile": f"{folder.name}/run_it025_model.star",
        "rlnExperimentalDataStarFile": f"{folder.name}/run_it025_data.star", "rlnParticleDiameter": 120.0}},
        version=50001)
    return {"good": [1, 2, 3], "junk": [4, 5, 6], "counts": counts}


def test_auto_selection_rejects_noise_and_blobs(relion_dir, tmp_path):
    truth = _synthetic_run(relion_dir, tmp_path / "C2D")
    res = select_classes(tmp_path / "C2D" / "run_it025_optimiser.star", tmp_path / "auto", auto=True,
                         root=tmp_path, gallery=False)
    sc = res.scores.set_index("rlnClassNumber")
    assert sorted(res.selected) == truth["good"], sc[["rlnClassScore", "cryopipeScoreFImg"]]
    assert res.n_particles_selected == sum(truth["counts"][k - 1] for k in truth["good"])
    assert sc.loc[truth["good"], "rlnClassScore"].min() > 0.6
    assert sc.loc[truth["junk"], "rlnClassScore"].max() < 0.35
    # the blob has the best resolution, distribution and accuracies of all: rejected by its image alone
    assert sc.loc[5, "cryopipeScoreFRes"] == 1.0 and sc.loc[5, "cryopipeScoreFImg"] < 0.1
    assert sc.loc[4, "cryopipeScoreFContrast"] < 0.4            # empty ice: no contrast
    # RELION's safety nets: at least N classes / particles, best scores first
    res = select_classes(tmp_path / "C2D" / "run_it025_model.star", tmp_path / "auto4", auto=True,
                         select_min_nr_classes=4, root=tmp_path, gallery=False)
    best_junk = int(sc.loc[truth["junk"], "rlnClassScore"].idxmax())
    assert sorted(res.selected) == sorted(truth["good"] + [best_junk])
    keep = auto_select(sc["rlnClassScore"].to_numpy(), np.asarray(truth["counts"]), min_score=0.99,
                       min_nr_particles=400)
    assert keep.sum() == 3 and np.asarray(truth["counts"])[keep].sum() >= 400
    with pytest.raises(CryopipeError, match="min_score"):
        select_classes(tmp_path / "C2D" / "run_it025_model.star", tmp_path / "none", auto=True, min_score=0.99,
                       root=tmp_path)
    res = select_classes(tmp_path / "C2D" / "run_it025_model.star", tmp_path / "empty", auto=True, min_score=0.99,
                         allow_empty=True, root=tmp_path, gallery=False)
    assert res.n_particles_selected == 0
    assert len(read_star(tmp_path / "empty" / "particles.star")["particles"]) == 0


def test_cli_auto_in_project(relion_dir, tmp_path, monkeypatch):
    _synthetic_run(relion_dir, tmp_path / "Class2D" / "job003")
    # names in the run are relative to the project root
    for f in ("run_it025_model.star", "run_it025_optimiser.star"):
        p = tmp_path / "Class2D" / "job003" / f
        p.write_text(p.read_text().replace("job003/run", "Class2D/job003/run"))
    monkeypatch.chdir(tmp_path)
    assert _run_cli(["--classes", "--i", "Class2D/job003/run_it025_optimiser.star", "--auto", "--recenter",
                     "--regroup", "4", "--o", "Select/job005/"]) == 0
    job = tmp_path / "Select" / "job005"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    pipe = read_star(tmp_path / "default_pipeline.star")
    procs = pipe["pipeline_processes"]
    assert procs.loc[procs["rlnPipeLineProcessName"] == "Select/job005/", "rlnPipeLineProcessTypeLabel"].item() \
        == "relion.select.class2dauto"
    nodes = dict(zip(pipe["pipeline_nodes"]["rlnPipeLineNodeName"], pipe["pipeline_nodes"]["rlnPipeLineNodeTypeLabel"]))
    assert nodes["Select/job005/particles.star"] == "ParticleGroupMetadata.star.relion"
    assert nodes["Select/job005/class_averages.star"] == "Image2DGroupMetadata.star.relion.classaverages"
    assert nodes["Class2D/job003/run_it025_optimiser.star"] == "OptimiserData.star.relion.class2d"
    ca = read_star(job / "class_averages.star")[""]
    assert sorted(ca["rlnClassNumber"]) == [1, 2, 3]
    assert all(n.endswith("@Select/job005/class_averages.mrcs") for n in ca["rlnReferenceImage"])
    parts = read_star(job / "particles.star")["particles"]
    assert parts["rlnImageName"].str.endswith("@Extract/job004/particles.mrcs").all()   # names kept
    assert parts["rlnGroupNumber"].value_counts().min() >= len(parts) // 4
    assert (job / "class_averages.png").stat().st_size > 1000
    # manual selection: relion.select.interactive
    assert _run_cli(["--classes", "--i", "Class2D/job003/run_it025_model.star", "--select_classes", "2",
                     "--o", "Select/job006/"]) == 0
    procs = read_star(tmp_path / "default_pipeline.star")["pipeline_processes"]
    assert procs.loc[procs["rlnPipeLineProcessName"] == "Select/job006/", "rlnPipeLineProcessTypeLabel"].item() \
        == "relion.select.interactive"
    with pytest.raises(CryopipeError, match="exactly one"):
        _run_cli(["--classes", "--i", "Class2D/job003/run_it025_model.star", "--o", "Select/job007/"])


# ------------------------------------------------------------------------------------------------ gallery, errors


def test_gallery_highlights_selected(tmp_path):
    import matplotlib.image as mpimg

    n = 32
    c = torch.arange(n, dtype=torch.float32) - n // 2
    imgs = torch.stack([torch.exp(-(c[:, None] ** 2 + (c[None, :] - s) ** 2) / 20) for s in range(-3, 3)])
    plain = write_class_gallery(tmp_path / "plain.png", imgs, distribution=np.full(6, 1 / 6),
                                resolution=np.full(6, 20.0), order=np.arange(6)[::-1])
    marked = write_class_gallery(tmp_path / "marked.png", imgs, distribution=np.full(6, 1 / 6),
                                 resolution=np.full(6, 20.0), selected=[True, False, True, False, False, False],
                                 title="a run with six classes")

    def green(path):
        a = mpimg.imread(path)[..., :3]
        return int(((a[..., 1] > 0.6) & (a[..., 0] < 0.3) & (a[..., 2] < 0.3)).sum())

    assert green(plain) == 0
    assert green(marked) > 100


def test_parse_class_numbers_and_input_errors(c2d, tmp_path):
    assert parse_class_numbers("1,3-5, 3") == [1, 3, 4, 5]
    f = tmp_path / "cls.txt"
    f.write_text("# good ones\n2\n4 1\n")
    assert parse_class_numbers(str(f), 4) == [2, 4, 1]
    for bad in ("0", "5", "a", "3-1", ""):
        with pytest.raises(CryopipeError):
            parse_class_numbers(bad, 4)
    with pytest.raises(CryopipeError, match="exactly one"):
        select_classes(c2d / "run_it005_model.star", tmp_path / "x", root=tmp_path)
    with pytest.raises(CryopipeError, match="does not exist"):
        select_classes(c2d / "run_it005_model.star", tmp_path / "x", select="7", root=tmp_path)
    lone = tmp_path / "lone_model.star"
    lone.write_text((c2d / "run_it005_model.star").read_text())
    with pytest.raises(CryopipeError, match="no data STAR"):
        find_class2d_run(lone)
    with pytest.raises(CryopipeError, match="not a classification"):
        find_class2d_run(c2d / "particles.star")


def test_3d_run_selects_particles_only(c2d, tmp_path):
    """A 3D classification (rlnReferenceDimensionality 3): particles by class number; no averages, no --auto."""
    blocks, version = read_star_with_version(c2d / "run_it005_model.star")
    blocks["model_general"]["rlnReferenceDimensionality"] = 3
    blocks["model_classes"]["rlnReferenceImage"] = [f"run_it005_class{k:03d}.mrc" for k in range(1, 5)]
    write_star(tmp_path / "run_it005_model.star", blocks, version=version)
    (tmp_path / "run_it005_data.star").write_text((c2d / "run_it005_data.star").read_text())
    res = select_classes(tmp_path / "run_it005_model.star", tmp_path / "s3", select="2,3", root=tmp_path)
    assert res.n_particles_selected == FIXTURE_COUNTS[2] + FIXTURE_COUNTS[3]
    assert res.class_averages_star is None and res.gallery_png is None and res.scores is None
    with pytest.raises(CryopipeError, match="2D"):
        select_classes(tmp_path / "run_it005_model.star", tmp_path / "a3", auto=True, root=tmp_path)

"""The command line itself: help text and one-line errors for output-path problems."""

from __future__ import annotations

import os

import pytest

from cryopipe.cli import build_parser
from cryopipe.cli import main as cli_main


def test_help_has_no_empty_defaults():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "job")
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for line in text.splitlines():  # never two defaults in one option's help
            assert line.lower().count("default") <= 1 or "(default:" not in line, (name, line)


def test_output_under_an_existing_file_is_one_line(relion_tomo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--tn", "TS_01",
                   "--bin", "8", "--o", "afile/sub"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "afile" in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_is_one_line(relion_tomo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--tn", "TS_01",
                       "--bin", "8", "--o", "locked/out"])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "locked" in err[0], err


@pytest.mark.parametrize("job", ["simulate", "reconstruct", "postprocess", "mask-create", "align-symmetry"])
@pytest.mark.parametrize("value", ["0", "-2.5"])
def test_angpix_must_be_positive(job, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    required = {"simulate": [], "reconstruct": ["--i", "x.star", "--o", "x.mrc"], "postprocess": ["--i", "h1.mrc"],
                "mask-create": ["--i", "m.mrc", "--o", "mask.mrc"],
                "align-symmetry": ["--i", "m.mrc", "--o", "a.mrc", "--sym", "C2"]}
    rc = cli_main([job, *required[job], "--angpix", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"--angpix {float(value):g}" in err[0], err
    assert list(tmp_path.iterdir()) == []


def _copy_projections(relion_dir, tmp_path):
    """RELION's 40 CTF projections (STAR + stack) copied into ``tmp_path``: (star blocks, stack array)."""
    import shutil

    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    shutil.copy(relion_dir / "proj_ctf.star", tmp_path / "p.star")
    stack, _ = read_mrc(relion_dir / "proj_ctf.mrcs")
    return read_star(tmp_path / "p.star"), stack


def test_non_finite_pixel_is_one_line(relion_dir, tmp_path, monkeypatch, capsys):
    """One NaN pixel in one particle used to give an all-NaN map and exit status 0."""
    from cryopipe.io.mrc import write_mrc

    monkeypatch.chdir(tmp_path)
    _, stack = _copy_projections(relion_dir, tmp_path)
    stack[7, 10, 11] = float("nan")
    write_mrc(tmp_path / "proj_ctf.mrcs", stack, 3.0)
    rc = cli_main(["reconstruct", "--i", "p.star", "--o", "map.mrc", "--ctf"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (the progress bar aside)
    assert rc == 1 and len(err) == 1 and "non-finite" in err[0] and "particle 8" in err[0], err
    assert not (tmp_path / "map.mrc").exists()


def test_non_finite_defocus_is_one_line(relion_dir, tmp_path, monkeypatch, capsys):
    """rlnDefocusU = inf used to give an all-zero map."""
    import shutil

    from cryopipe.io.star import write_star

    monkeypatch.chdir(tmp_path)
    blocks, _ = _copy_projections(relion_dir, tmp_path)
    shutil.copy(relion_dir / "proj_ctf.mrcs", tmp_path / "proj_ctf.mrcs")
    blocks["particles"].loc[4, "rlnDefocusU"] = float("inf")
    write_star(tmp_path / "p.star", blocks)
    rc = cli_main(["reconstruct", "--i", "p.star", "--o", "map.mrc", "--ctf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "rlnDefocusU of particle 5" in err[0], err
    assert not (tmp_path / "map.mrc").exists()

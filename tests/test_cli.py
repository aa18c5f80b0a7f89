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
                "mask-create": ["--i", "m.mrc", "--o", "mask.mrc"], "align-symmetry": ["--i", "m.mrc", "--o", "a.mrc", "--sym", "C2"]}
    rc = cli_main([job, *required[job], "--angpix", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"--angpix {float(value):g}" in err[0], err
    assert list(tmp_path.iterdir()) == []

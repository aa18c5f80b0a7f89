"""Tests for cryopipe.io.atomic.atomic_path."""

from __future__ import annotations

import os

import pytest

from cryopipe.io.atomic import atomic_path


def test_success_replaces_target(tmp_path):
    target = tmp_path / "out.star"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.suffix == ".star"
        assert not tmp.exists()
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]


def test_exception_keeps_old_and_removes_temp(tmp_path):
    target = tmp_path / "out.mrc"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mrc"]


def test_new_file_fsync_and_permissions(tmp_path):
    target = tmp_path / "new.txt"
    with atomic_path(target, fsync=True) as tmp:
        tmp.write_text("x")
    assert target.read_text() == "x"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_nothing_written_nothing_renamed(tmp_path):
    target = tmp_path / "never.txt"
    with atomic_path(target):
        pass
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

"""Atomic writes: a failed write leaves neither a partial output nor a temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from medidiff.io.atomic import atomic_dir, atomic_file


def test_atomic_file_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "scan.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "series"
    with atomic_dir(target) as tmp:
        (tmp / "a.dcm").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.dcm").write_text("2")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["a.dcm"]
    with atomic_dir(target) as tmp:
        (tmp / "c.dcm").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """mkstemp/mkdtemp create private files; our outputs must be readable like any file the user writes."""
    import os
    import stat

    from medidiff.io.atomic import atomic_dir, atomic_file

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.nii.gz") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "series") as tmp:
            (tmp / "f").write_bytes(b"y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == 0o755

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


def test_every_temporary_carries_the_one_marker(tmp_path: Path) -> None:
    """Files, folders and the folder moved aside while replacing: all named .<name>.medidiff-tmp-<random>."""
    from medidiff.io.atomic import TEMP_MARKER, is_temporary_name

    seen: list[str] = []
    with atomic_file(tmp_path / "scan.nii.gz") as tmp:
        seen.append(tmp.name)
        assert tmp.name.startswith(".scan.nii.gz" + TEMP_MARKER) and tmp.name.endswith(".nii.gz")
        tmp.write_text("x")
    (tmp_path / "series").mkdir()
    with atomic_dir(tmp_path / "series") as tmp:
        seen.append(tmp.name)
        seen += [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert seen and all(is_temporary_name(name) for name in seen)
    for ordinary in ("scan.nii.gz", ".hidden", "notes.tmp", ".x.tmp.nii.gz", "medidiff-tmp-file"):
        assert not is_temporary_name(ordinary), ordinary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz", "series"]


def test_write_text_and_remove(tmp_path: Path) -> None:
    from medidiff.io.atomic import remove, write_bytes, write_text

    assert write_text(tmp_path / "a" / "m.json", "{}", fsync=True).read_text() == "{}"
    assert write_bytes(tmp_path / "b.png", b"\x89PNG").read_bytes() == b"\x89PNG"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("1")
    remove(tmp_path / "d")
    remove(tmp_path / "b.png")
    remove(tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_long_names_get_a_valid_temporary(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 240 + ".nii.gz")
    with atomic_file(target) as tmp:
        tmp.write_text("1")
    assert target.read_text() == "1"

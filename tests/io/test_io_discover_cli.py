"""Discovery of messy folders (broken files become named problems) and the CLI run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.io import Volume, discover, read_scan, write_nifti
from tests.io.conftest import PYDICOM_FILES, write_classic_series

MEDIDIFF = Path(sys.executable).parent / "medidiff"
INFO_KEYS = {"path", "kind", "shape", "spacing", "affine", "modality", "description", "n_files", "problems"}


def _messy_folder(root: Path) -> Path:
    """Good series plus every kind of broken input."""
    write_classic_series(root / "patient" / "series_a", n_slices=6, series_number=3, seed=1)
    write_classic_series(
        root / "patient" / "series_a", n_slices=4, series_number=5, seed=2, angles_deg=(0, 0, 0)
    )
    broken = root / "broken"
    broken.mkdir(parents=True)
    good = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    (broken / "truncated_pixels.dcm").write_bytes(good[:-500])
    (broken / "truncated_header.dcm").write_bytes(good[:400])
    (broken / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (broken / "empty.dcm").write_bytes(b"")
    shutil.copy(PYDICOM_FILES / "rtstruct.dcm", broken / "rtstruct.dcm")
    shutil.copy(PYDICOM_FILES / "reportsi.dcm", broken / "report.dcm")
    (broken / "garbage.nii.gz").write_bytes(np.random.default_rng(1).bytes(1000))
    (broken / "notes.txt").write_text("not a scan")  # skipped silently
    return root


EXPECTED_PROBLEMS = {
    "truncated_pixels.dcm": "truncated",
    "truncated_header.dcm": "",  # any named problem
    "random.dcm": "not a DICOM file",
    "empty.dcm": "empty file",
    "rtstruct.dcm": "RT Structure Set Storage",
    "report.dcm": "SR Storage",
    "garbage.nii.gz": "NIfTI",
}


def test_broken_inputs_are_named_problems(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path)
    sources = list(discover(root))
    invalid = {s.path.name: s for s in sources if s.kind == "invalid"}
    assert set(invalid) == set(EXPECTED_PROBLEMS)
    for name, expected in EXPECTED_PROBLEMS.items():
        (problem,) = invalid[name].problems
        assert expected in problem and problem.strip(), (name, problem)
    series = [s for s in sources if s.kind == "dicom"]
    assert sorted(s.shape[2] for s in series) == [4, 6]
    assert all(s.problems == [] and s.modality == "MR" for s in series)
    # keys: stable, unique, no patient data
    keys = [s.key for s in sources]
    assert len(set(keys)) == len(keys)
    assert not any("PHANTOM" in k.upper() for k in keys)
    assert [s.key for s in discover(root)] == keys


def test_read_scan_on_single_files(tmp_path: Path) -> None:
    vol = read_scan(PYDICOM_FILES / "MR_small.dcm")
    assert vol.shape == (64, 64, 1) and vol.meta["modality"] == "MR"
    assert vol.meta["dicom_header"].get("PixelData") is None
    write_nifti(vol, tmp_path / "x.nii.gz")
    assert read_scan(tmp_path / "x.nii.gz").shape == (64, 64, 1)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MEDIDIFF), *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_info_json_as_a_user_runs_it(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path / "in")
    proc = _run("info", str(root), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    assert all(set(row) == INFO_KEYS for row in rows)
    kinds = sorted(row["kind"] for row in rows)
    assert kinds.count("dicom") == 2 and kinds.count("invalid") == len(EXPECTED_PROBLEMS)
    dicom = [row for row in rows if row["kind"] == "dicom"]
    for row in dicom:
        assert np.asarray(row["affine"]).shape == (4, 4)
        assert row["spacing"][:2] == pytest.approx([0.8, 0.9]) and row["n_files"] == row["shape"][2]
    assert all(row["problems"] for row in rows if row["kind"] == "invalid")
    table = _run("info", str(root), cwd=tmp_path)
    assert table.returncode == 0 and "truncated" in table.stdout


def _implicit_vr_labelled_explicit(path: Path) -> Path:
    """MR_small encoded implicit VR but labelled Explicit VR Little Endian: pydicom warns on reading."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, force_encoding=True)
    return path


def test_pydicom_warnings_become_problems_not_stderr(tmp_path: Path) -> None:
    """`medidiff info` and `convert` keep pydicom's warnings off stderr and report them per scan."""
    _implicit_vr_labelled_explicit(tmp_path / "in" / "odd" / "mr.dcm")
    shutil.copy(PYDICOM_FILES / "SC_rgb_jpeg.dcm", tmp_path / "in" / "colour.dcm")  # warns, then rejected
    import warnings

    import pydicom

    with warnings.catch_warnings(record=True) as caught:  # the fixture really makes pydicom complain
        warnings.simplefilter("always")
        pydicom.dcmread(tmp_path / "in" / "odd" / "mr.dcm")
    assert any("Expected explicit VR" in str(w.message) for w in caught)

    proc = _run("info", str(tmp_path / "in"), "--json", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = {Path(row["path"]).name: row for row in json.loads(proc.stdout)}
    assert rows["odd"]["kind"] == "dicom" and rows["odd"]["shape"] == [64, 64, 1]
    assert any("Expected explicit VR" in p for p in rows["odd"]["problems"])
    assert rows["colour.dcm"]["kind"] == "invalid"
    proc = _run(
        "convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--to", "nifti", cwd=tmp_path
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr  # colour.dcm is not converted: "some failed"
    assert "Warning" not in proc.stderr and "Expected explicit VR" not in proc.stderr
    assert "Expected explicit VR" in proc.stdout  # named as a note of that scan
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


def test_cli_info_missing_path_fails(tmp_path: Path) -> None:
    proc = _run("info", str(tmp_path / "nope"), "--json", cwd=tmp_path)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_cli_convert_to_nifti_and_dicom(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path / "in")
    proc = _run("convert", str(root), "--out", str(tmp_path / "nii"), "--to", "nifti", cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the broken files are not converted
    assert "Traceback" not in proc.stdout + proc.stderr
    outputs = sorted((tmp_path / "nii").rglob("*.nii.gz"))
    assert len(outputs) == 2
    shapes = sorted(nib.load(p).shape[2] for p in outputs)
    assert shapes == [4, 6]
    for name in EXPECTED_PROBLEMS:  # each broken file named with its problem
        assert name in proc.stdout
    proc = _run(
        "convert", str(tmp_path / "nii"), "--out", str(tmp_path / "dcm"), "--to", "dicom", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    series_dirs = [d for d in (tmp_path / "dcm").iterdir() if d.is_dir()]
    assert len(series_dirs) == 2
    for d in series_dirs:
        nii = tmp_path / "nii" / f"{d.name}.nii.gz"
        original, back = read_scan(nii), read_scan(d)
        np.testing.assert_allclose(back.affine, original.affine, atol=1e-4)
        assert np.abs(back.array - original.array).max() <= 1e-3 * float(np.ptp(original.array))


def test_cli_convert_fails_when_nothing_converts(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "random.dcm").write_bytes(np.random.default_rng(0).bytes(100))
    proc = _run(
        "convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--to", "nifti", cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "random.dcm" in proc.stdout and "not a DICOM file" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_convert_kspace_and_4d_nifti(tmp_path: Path) -> None:
    from medidiff.io import KSpaceData, write_kspace

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 8, 6)) + 1j * rng.standard_normal((2, 8, 6))).astype(np.complex64)
    write_kspace(tmp_path / "in" / "scan.h5", KSpaceData(k, None, np.eye(4)))
    data = rng.random((5, 6, 7, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in" / "four.nii.gz")
    proc = _run(
        "convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--to", "nifti", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["four-vol0.nii.gz", "four-vol1.nii.gz", "scan.nii.gz"]
    assert nib.load(tmp_path / "out" / "scan.nii.gz").shape == (8, 6, 2)


def test_volume_written_then_discovered(tmp_path: Path) -> None:
    vol = Volume(np.ones((3, 3, 3)), np.eye(4))
    write_nifti(vol, tmp_path / "a.nii.gz")
    (source,) = list(discover(tmp_path / "a.nii.gz"))
    assert source.kind == "nifti" and source.key == "a.nii.gz"


def test_every_shipped_pydicom_file_is_a_scan_or_a_named_problem() -> None:
    """A sweep over pydicom's whole test-file tree.

    Odd encodings, DICOMDIRs, RT, SR, colour, broken files."""
    from medidiff.io import ScanError

    sources = list(discover(PYDICOM_FILES))
    assert len(sources) > 50
    loaded = 0
    for source in sources:
        assert source.kind in ("dicom", "nifti", "kspace", "invalid")
        if source.kind == "invalid" or source.problems:
            assert source.problems and all(p.strip() for p in source.problems)
            continue
        try:
            vol = source.load()
        except ScanError as exc:  # e.g. a decoder that is not installed: named, not a traceback
            assert exc.problem
        else:
            loaded += 1
            assert vol.array.dtype == np.float32 and np.isfinite(vol.affine).all()
    assert loaded >= 10


def test_nibabel_shipped_dicom_files_are_scans_or_named_problems_and_match_dcm2niix(tmp_path: Path) -> None:
    """nibabel's DICOM test data (Siemens mosaics, Philips enhanced, odd headers) through discover;
    every volume we build agrees with dcm2niix wherever dcm2niix produces one."""
    import gzip

    from tests.io.test_io_dicom_read import _assert_same_world

    nib_root = Path(nib.__file__).parent
    unzipped = tmp_path / "unzipped"
    for gz in sorted((nib_root / "nicom" / "tests" / "data").glob("*.dcm.gz")):
        folder = unzipped / gz.name.removesuffix(".dcm.gz")
        folder.mkdir(parents=True)
        (folder / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    roots = [nib_root / "tests" / "data", nib_root / "nicom" / "tests" / "data", unzipped]
    sources = [s for root in roots for s in discover(root)]
    assert all(s.kind in ("dicom", "nifti", "kspace", "invalid") for s in sources)
    assert all(p.strip() for s in sources for p in s.problems)
    assert all(s.problems for s in sources if s.kind == "invalid")
    gzipped = [s for s in sources if s.path.name.endswith(".dcm.gz")]
    assert len(gzipped) == 3 and all("gzip" in s.problems[0] for s in gzipped)
    dicom = [s for s in sources if s.kind == "dicom"]
    mosaics = [s for s in dicom if any("mosaic" in p for p in s.problems)]
    assert len(mosaics) == 4 and all(s.affine is None for s in mosaics)  # 0/1.dcm twice, two DWI files
    compared = 0
    for n, source in enumerate(s for s in dicom if not s.problems):
        vol = source.load()
        assert vol.array.dtype == np.float32 and np.isfinite(vol.array).all()
        folder, out = tmp_path / f"in{n}", tmp_path / f"d2n{n}"
        folder.mkdir()
        out.mkdir()
        for f in source.files:
            shutil.copy(f, folder / f.name)
        exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
        proc = subprocess.run(
            [exe, "-z", "n", "-b", "n", "-o", str(out), str(folder)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        nii = sorted(out.glob("*.nii"))
        if proc.returncode != 0 or len(nii) != 1:  # dcm2niix cannot read slicethickness_empty_string.dcm
            continue
        _assert_same_world(nib.load(nii[0]), vol, atol_mm=1e-3)
        compared += 1
    assert compared >= 2  # decimal_rescale.dcm and the 176-slice Philips enhanced MPRAGE

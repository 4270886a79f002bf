"""fastMRI-style k-space HDF5: ``kspace`` (S, H, W) or (S, C, H, W) complex, optional ``mask``,
a ``reconstruction_rss`` / ``reconstruction_esc`` reference and an ``ismrmrd_header`` XML.

Spacing comes from the header's encodedSpace field of view when present. Files written here also carry
an ``affine`` attribute so our own files round-trip their geometry exactly (fastMRI files have none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.atomic import atomic_file
from medidiff.io.errors import ScanError, check_regular_file
from medidiff.io.limits import check_voxels
from medidiff.io.volume import Volume, geometry_problem, nonfinite_problem

KSPACE_SUFFIXES = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# fastMRI attributes safe to carry along (patient_id is deliberately not read)
_SAFE_ATTRS = ("acquisition", "max", "norm")
# An ISMRMRD header is a few kB; anything far larger is not one (and is not read into memory).
_MAX_HEADER_BYTES = 16 * 2**20


class HeaderError(ValueError):
    """An ISMRMRD header that cannot be used: not XML, refused XML constructs, or non-numeric values."""


@dataclass
class KSpaceData:
    """Measured k-space plus what is needed to place and judge its image.

    ``affine`` is the 4x4 voxel → RAS mm map of the image grid with array axes (i=H, j=W, k=S).
    """

    kspace: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    reference: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.kspace = np.asarray(self.kspace, dtype=np.complex64)
        if self.kspace.ndim not in (3, 4):
            raise ValueError(f"k-space must be (S, H, W) or (S, C, H, W), got shape {self.kspace.shape}")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=np.float32)
        if self.reference is not None:
            self.reference = np.asarray(self.reference, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def multicoil(self) -> bool:
        return self.kspace.ndim == 4

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, S): the shape of the image Volume."""
        s, h, w = self.kspace.shape[0], self.kspace.shape[-2], self.kspace.shape[-1]
        return (int(h), int(w), int(s))

    def image(self) -> Volume:
        """|ifft2c(kspace)| per slice (root-sum-of-squares over coils) as a Volume (H, W, S)."""
        k = self.kspace
        img = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1)
        )
        mag = np.sqrt((np.abs(img) ** 2).sum(axis=1)) if k.ndim == 4 else np.abs(img)
        meta = {k2: v for k2, v in self.meta.items() if k2 != "problems"}
        meta.setdefault("modality", "MR")
        meta["problems"] = list(self.meta.get("problems", []))
        if self.path is not None:
            meta.setdefault("source_files", [str(self.path)])
        return Volume(np.moveaxis(mag, 0, -1).astype(np.float32), self.affine, meta)


def is_kspace_path(path: str | Path) -> bool:
    """True when the name ends in .h5/.hdf5."""
    return str(path).lower().endswith(KSPACE_SUFFIXES)


def is_hdf5_file(path: str | Path) -> bool:
    """True when the file starts with the HDF5 signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def parse_ismrmrd_header(xml: str | bytes) -> dict[str, Any]:
    """encodedSpace / reconSpace matrix size and field of view (mm) from an ISMRMRD XML header.

    The XML is untrusted: it is parsed with ``defusedxml`` (no entities, no DTD, no external references).
    Raises ``HeaderError`` naming what is wrong (malformed XML, refused construct, a non-numeric value).
    """
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        root = DET.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise HeaderError(f"ismrmrd_header refused: {type(exc).__name__} (unsafe XML construct)") from None
    except Exception as exc:  # noqa: BLE001 - ParseError and encoding errors of arbitrary bytes
        raise HeaderError(f"ismrmrd_header is not valid XML ({type(exc).__name__}: {exc})") from None

    def strip(tag: Any) -> str:
        return str(tag).rsplit("}", 1)[-1]

    def find(node, *names):
        for name in names:
            if node is None:
                return None
            node = next((c for c in node if strip(c.tag) == name), None)
        return node

    def number(node, space: str, field_name: str, axis: str) -> float:
        text = (node.text or "").strip()
        try:
            value = float(text)
        except ValueError:
            raise HeaderError(
                f"ismrmrd_header {space}/{field_name}/{axis} is {text[:20]!r}, not a number"
            ) from None
        if not np.isfinite(value):
            raise HeaderError(f"ismrmrd_header {space}/{field_name}/{axis} is {text[:20]!r}, not finite")
        return value

    out: dict[str, Any] = {}
    encoding = find(root, "encoding")
    for space in ("encodedSpace", "reconSpace"):
        node = find(encoding, space)
        if node is None:
            continue
        matrix = find(node, "matrixSize")
        fov = find(node, "fieldOfView_mm")
        if matrix is not None:
            out[f"{space}_matrix"] = [
                int(number(find(matrix, a), space, "matrixSize", a))
                for a in "xyz"
                if find(matrix, a) is not None
            ]
        if fov is not None:
            out[f"{space}_fov_mm"] = [
                number(find(fov, a), space, "fieldOfView_mm", a) for a in "xyz" if find(fov, a) is not None
            ]
    return out


def _header_spacing(info: dict[str, Any]) -> tuple[float, float, float] | None:
    """(H, W, slice) spacing from encodedSpace: fastMRI's H is the readout (x), W the phase (y)."""
    matrix, fov = info.get("encodedSpace_matrix"), info.get("encodedSpace_fov_mm")
    if not matrix or not fov or len(matrix) < 3 or len(fov) < 3 or min(matrix[:2]) <= 0:
        return None
    spacing = (fov[0] / matrix[0], fov[1] / matrix[1], fov[2] / max(matrix[2], 1))
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        return None
    return spacing


def _centred_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Diagonal affine with the grid centred on the origin (fastMRI files carry no position)."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return aff


def _geometry(stored_affine, header: str | None, shape: tuple[int, int, int], problems: list[str]):
    """Affine of the (H, W, S) image grid: our stored attribute, else the ISMRMRD field of view, else 1 mm.

    Whatever is returned passes ``geometry_problem``; an unusable header or stored affine is a problem
    in ``problems`` (the fallback is used), never an exception.
    """
    header_info: dict[str, Any] = {}
    if header:
        try:
            header_info = parse_ismrmrd_header(header)
        except HeaderError as exc:
            problems.append(str(exc))
    if stored_affine is not None:
        bad = (
            f"has shape {stored_affine.shape}"
            if stored_affine.shape != (4, 4)
            else geometry_problem(stored_affine)
        )
        if not bad:
            return stored_affine, header_info
        problems.append(f"stored 'affine' attribute ignored ({bad})")
    spacing = _header_spacing(header_info)
    matrix, fov = header_info.get("encodedSpace_matrix"), header_info.get("encodedSpace_fov_mm")
    if spacing is None and matrix and fov:
        problems.append(
            f"ismrmrd_header encodedSpace gives no positive spacing (matrix {matrix}, field of view {fov} mm)"
        )
    if spacing is None:
        spacing = (1.0, 1.0, 1.0)
        problems.append("no usable ismrmrd_header field of view: spacing assumed 1 mm, orientation unknown")
    return _centred_affine(spacing, shape), header_info


def _read_header_text(f: Any, path: Path) -> str | None:
    """The ``ismrmrd_header`` dataset as text (None when absent), refused when implausibly large."""
    if "ismrmrd_header" not in f:
        return None
    node = f["ismrmrd_header"]
    nbytes = int(getattr(node, "nbytes", 0) or 0) if hasattr(node, "shape") else 0
    if nbytes > _MAX_HEADER_BYTES:
        raise ScanError(path, f"ismrmrd_header declares {nbytes:,} bytes; an ISMRMRD header is a few kB")
    h = node[()]
    if isinstance(h, np.ndarray):
        h = h.tobytes() if h.dtype.kind in "SUV" and h.size == 1 else None
        if h is None:
            return None
    return h.decode("utf-8", "replace") if isinstance(h, bytes) else str(h)


def _kspace_layout(ds: Any, path: Path, max_voxels: int | None) -> tuple[tuple[int, ...], bool]:
    """The (S, H, W) or (S, C, H, W) shape of the complex samples and whether they are stored as pairs.

    Checked on the dataset header, before reading: real-valued data, a wrong rank, a zero-length axis
    and a size over the voxel limit are ScanErrors.
    """
    shape = tuple(int(s) for s in ds.shape or ())
    dtype = ds.dtype
    pairs = not np.issubdtype(dtype, np.complexfloating)
    if pairs and not (len(shape) in (4, 5) and shape[-1] == 2 and dtype.kind in "fiu"):
        raise ScanError(path, f"'kspace' is real-valued {dtype} with shape {shape}; expected complex")
    if pairs:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise ScanError(path, f"'kspace' has shape {shape}; expected (S, H, W) or (S, C, H, W)")
    if 0 in shape:
        raise ScanError(path, f"'kspace' has a zero-length axis (shape {shape})")
    itemsize = (2 * dtype.itemsize) if pairs else dtype.itemsize
    check_voxels(path, shape, max(itemsize, 8), what="complex k-space samples", limit=max_voxels)
    return shape, pairs


def _check_hdf5(path: str | Path) -> Path:
    """The path, if it names a non-empty HDF5 file; a ScanError naming the problem otherwise."""
    path = check_regular_file(path, "k-space file")
    if not is_hdf5_file(path):
        raise ScanError(path, "not an HDF5 file")
    return path


def _require_kspace(f: Any, path: Path) -> None:
    """Raise a ScanError when the open HDF5 file has no 'kspace' dataset."""
    if "kspace" not in f:
        raise ScanError(path, f"HDF5 file has no 'kspace' dataset (has: {sorted(f.keys())[:8]})")


def probe_kspace(path: str | Path, *, max_voxels: int | None = None) -> dict[str, Any]:
    """Shape (H, W, S), affine, description and problems of a k-space file without reading its arrays."""
    import h5py

    path = _check_hdf5(path)
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            _require_kspace(f, path)
            shape, _ = _kspace_layout(f["kspace"], path, max_voxels)
            if f["kspace"].id.get_storage_size() == 0:  # never written: reads as all zero (load refuses it)
                problems.append("'kspace' holds no stored samples (all zero): nothing was measured")
            header = _read_header_text(f, path)
            stored = np.asarray(f.attrs["affine"], dtype=np.float64) if "affine" in f.attrs else None
            description = _description(f, path)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for corrupt files
        raise ScanError(path, f"unreadable HDF5 k-space ({type(exc).__name__}: {exc})") from None
    image_shape = (int(shape[-2]), int(shape[-1]), int(shape[0]))
    affine, _ = _geometry(stored, header, image_shape, problems)
    return {
        "shape": image_shape,
        "affine": affine,
        "description": description,
        "coils": int(shape[1]) if len(shape) == 4 else 1,
        "problems": problems,
    }


def _description(f: Any, path: Path) -> str:
    """The file's ``description`` attribute, or its name without suffixes."""
    description = f.attrs.get("description", "")
    if isinstance(description, bytes):
        description = description.decode("utf-8", "replace")
    if isinstance(description, np.ndarray):
        description = ""
    return str(description) or path.name.split(".")[0]


def _read_dataset(f: Any, name: str, path: Path, max_voxels: int | None) -> np.ndarray:
    """A whole dataset as an array, after checking its declared size against the voxel limit."""
    ds = f[name]
    if not hasattr(ds, "shape"):
        raise ScanError(path, f"'{name}' is a group, not a dataset")
    check_voxels(path, ds.shape or (1,), ds.dtype.itemsize, what=f"'{name}' values", limit=max_voxels)
    return np.asarray(ds[()])


def read_kspace(
    path: str | Path, *, allow_nonfinite: bool = False, max_voxels: int | None = None
) -> KSpaceData:
    """Read a fastMRI-layout HDF5 file; every failure becomes a ScanError naming the file.

    Every dataset's declared size is checked against the voxel limit before it is read
    (``medidiff.io.limits``). Refused: all-zero k-space (nothing measured), NaN/Inf samples unless
    ``allow_nonfinite`` (then recorded in ``meta['problems']``). A non-finite or misshapen reference is
    dropped with a problem; an unusable header or stored affine falls back with a problem.
    """
    import h5py

    path = _check_hdf5(path)
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            _require_kspace(f, path)
            _, pairs = _kspace_layout(f["kspace"], path, max_voxels)
            raw = _read_dataset(f, "kspace", path, max_voxels)
            if pairs:
                raw = raw[..., 0] + 1j * raw[..., 1].astype(np.float32)
            mask = None
            if "mask" in f:
                mask = np.asarray(_read_dataset(f, "mask", path, max_voxels), dtype=np.float32)
            order = (
                ("reconstruction_rss", "reconstruction_esc")
                if raw.ndim == 4
                else ("reconstruction_esc", "reconstruction_rss")
            )
            reference, reference_name = None, None
            for name in order:
                if name in f:
                    reference = np.asarray(_read_dataset(f, name, path, max_voxels), dtype=np.float32)
                    reference_name = name
                    break
            header = _read_header_text(f, path)
            attrs = {
                k: (v.item() if hasattr(v, "item") and np.size(v) == 1 else v)
                for k, v in f.attrs.items()
                if k in _SAFE_ATTRS
            }
            stored_affine = np.asarray(f.attrs["affine"], dtype=np.float64) if "affine" in f.attrs else None
            description = _description(f, path)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for corrupt files
        raise ScanError(path, f"unreadable HDF5 k-space ({type(exc).__name__}: {exc})") from None

    kspace = raw.astype(np.complex64)
    del raw
    finite = np.isfinite(kspace)
    bad = int(kspace.size - np.count_nonzero(finite))
    if bad:
        message = f"{bad} k-space sample(s) are NaN or Inf (of {kspace.size})"
        if not allow_nonfinite:
            raise ScanError(path, message)
        problems.append(message)
    if not np.any(kspace[finite] if bad else kspace):
        raise ScanError(path, "k-space is all zero: nothing was measured")
    s, h, w = kspace.shape[0], kspace.shape[-2], kspace.shape[-1]
    affine, header_info = _geometry(stored_affine, header, (h, w, s), problems)
    if mask is not None:
        try:
            np.broadcast_to(mask, (h, w))
        except ValueError:
            problems.append(f"mask shape {mask.shape} does not broadcast to (H, W) = ({h}, {w}); ignored")
            mask = None
    if mask is not None and not np.all(np.isfinite(mask)):
        problems.append("mask has NaN or Inf values; ignored")
        mask = None
    if reference is not None and reference.shape != (s, h, w):
        problems.append(f"{reference_name} has shape {reference.shape}, not (S, H, W) = ({s}, {h}, {w})")
    if reference is not None and not np.all(np.isfinite(reference)):
        n_bad = int(reference.size - np.count_nonzero(np.isfinite(reference)))
        problems.append(f"{reference_name}: {nonfinite_problem(n_bad, reference.size)}; reference ignored")
        reference, reference_name = None, None
    meta: dict[str, Any] = {
        "modality": "MR",
        "description": description,
        "source_files": [str(path)],
        "reference_name": reference_name,
        "ismrmrd": header_info,
        "problems": problems,
        **attrs,
    }
    return KSpaceData(kspace, mask, affine, reference, meta, path)


def _ismrmrd_xml(data: KSpaceData) -> str:
    """A minimal ISMRMRD header carrying matrix size and field of view, so fastMRI tools see the spacing."""
    h, w, s = data.image_shape
    sp = np.linalg.norm(data.affine[:3, :3], axis=0)
    fov = (h * sp[0], w * sp[1], sp[2])
    space = (
        f"<matrixSize><x>{h}</x><y>{w}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov[0]:.6f}</x><y>{fov[1]:.6f}</y><z>{fov[2]:.6f}</z></fieldOfView_mm>"
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        f"<encoding><encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
        f"<encodingLimits><slice><minimum>0</minimum><maximum>{s - 1}</maximum><center>{s // 2}</center>"
        "</slice></encodingLimits></encoding></ismrmrdHeader>"
    )


def write_kspace(path: str | Path, data: KSpaceData) -> Path:
    """Write ``data`` in fastMRI layout (plus an ``affine`` attribute), atomically."""
    import h5py

    path = Path(path)
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=np.asarray(data.kspace, dtype=np.complex64))
        if data.mask is not None:
            f.create_dataset("mask", data=np.asarray(data.mask, dtype=np.float32))
        if data.reference is not None:
            name = "reconstruction_rss" if data.multicoil else "reconstruction_esc"
            f.create_dataset(name, data=np.asarray(data.reference, dtype=np.float32))
        f.create_dataset("ismrmrd_header", data=_ismrmrd_xml(data).encode("utf-8"))
        f.attrs["affine"] = np.asarray(data.affine, dtype=np.float64)
        f.attrs["acquisition"] = "multicoil" if data.multicoil else "singlecoil"
        if data.reference is not None:
            f.attrs["max"] = float(np.max(data.reference))
        desc = data.meta.get("description")
        if desc:
            f.attrs["description"] = str(desc)
    return path

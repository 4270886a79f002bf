"""``OUT/report.html``: one self-contained page (inline base64 PNGs, no scripts, no links) for reviewing a batch.

Per finished scan: the middle slice before (baseline back-projection), after (enhanced), their difference
and the sampling uncertainty, with the scan's metrics. Built from the manifest and the NIfTI outputs, so it
covers every scan of a resumed batch. Shows anonymous scan keys only, never patient data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

PANELS = ("before", "after", "difference", "uncertainty")
BEFORE = {
    "sr": "before: sinc upsampling",
    "sr_thick": "before: through-plane interpolation",
    "recon": "before: zero-filled",
}


def _middle_slice(path: Path, axis: int = 2) -> np.ndarray:
    """The middle slice across ``axis`` of a NIfTI file, read lazily (float32, displayed orientation)."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if len(shape) < 3:
        return np.rot90(np.asarray(img.dataobj, dtype=np.float32))
    index = [slice(None)] * 3
    index[axis] = shape[axis] // 2
    sl = np.asarray(img.dataobj[tuple(index)], dtype=np.float32)
    return np.rot90(sl)  # first remaining axis → right, second → up


def _view_axis(entry: dict[str, Any]) -> int:
    """In-plane views for sr and recon; for through-plane SR a plane that contains the slice direction."""
    return 1 if entry.get("task") == "sr_thick" else 2


def scan_slices(output_root: Path, entry: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Middle slices of a finished scan: before, after, difference and (when sampled) uncertainty."""
    outputs = entry.get("outputs") or {}
    if entry.get("status") != "done" or not outputs.get("enhanced") or not outputs.get("baseline"):
        return None
    axis = _view_axis(entry)
    after = _middle_slice(Path(output_root) / outputs["enhanced"], axis)
    before = _middle_slice(Path(output_root) / outputs["baseline"], axis)
    slices = {"before": before, "after": after}
    if before.shape == after.shape:
        slices["difference"] = after - before
    if outputs.get("uncertainty"):
        slices["uncertainty"] = _middle_slice(Path(output_root) / outputs["uncertainty"], axis)
    return slices


def _rgb(name: str, arr: np.ndarray, grey_range: tuple[float, float]) -> np.ndarray:
    """Colour-map one panel to uint8 RGB: grey images share a window; difference is symmetric."""
    from matplotlib import colormaps

    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64))
    if name == "difference":
        lim = float(np.percentile(np.abs(arr), 99.5)) or 1.0
        norm, cmap = (arr + lim) / (2 * lim), colormaps["RdBu_r"]
    elif name == "uncertainty":
        hi = float(np.percentile(arr, 99.5)) or 1.0
        norm, cmap = arr / hi, colormaps["magma"]
    else:
        lo, hi = grey_range
        norm, cmap = (arr - lo) / ((hi - lo) or 1.0), colormaps["gray"]
    return (cmap(np.clip(norm, 0, 1))[..., :3] * 255).astype(np.uint8)


def _grey_range(slices: dict[str, np.ndarray]) -> tuple[float, float]:
    ref = slices.get("after", next(iter(slices.values())))
    return float(np.percentile(ref, 0.5)), float(np.percentile(ref, 99.5))


def _upscale(rgb: np.ndarray, min_size: int = 192) -> np.ndarray:
    """Nearest-neighbour enlargement of tiny slices so they are visible."""
    factor = max(1, int(np.ceil(min_size / max(1, min(rgb.shape[:2])))))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1) if factor > 1 else rgb


def panel_images(slices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 RGB image per panel."""
    window = _grey_range(slices)
    return {name: _upscale(_rgb(name, slices[name], window)) for name in PANELS if name in slices}


def preview_strip(output_root: Path, entry: dict[str, Any]) -> np.ndarray | None:
    """The panels of a scan side by side (uint8 RGB), e.g. for an MLflow figure."""
    slices = scan_slices(output_root, entry)
    if not slices:
        return None
    images = list(panel_images(slices).values())
    height = max(im.shape[0] for im in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 4), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(padded, axis=1)


def _png_base64(rgb: np.ndarray) -> str:
    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, rgb, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px} h2{font-size:16px;margin:0 0 6px 0;word-break:break-all}
.scan{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.panels{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center}
img{width:220px;image-rendering:pixelated;border:1px solid #ccc;background:#000}
table{border-collapse:collapse;font-size:13px;margin-top:6px} td,th{border:1px solid #ddd;padding:2px 8px}
.failed{color:#a00}
"""


def render_report(output_root: Path, manifest: dict[str, Any]) -> str:
    """The report's HTML text."""
    scans = list(manifest.get("scans", {}).values())
    done = [s for s in scans if s.get("status") == "done"]
    failed = [s for s in scans if s.get("status") != "done"]
    params = {k: v for k, v in (manifest.get("params") or {}).items() if k != "model_identity"}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>medidiff enhance report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>medidiff enhance report</h1>",
        (
            f"<p>{len(done)} scan(s) enhanced, {len(failed)} failed. "
            f"Generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))}."
            " Panels: middle slice of the operator back-projection (<b>before</b>), the enhanced image "
            "(<b>after</b>), after − before (<b>difference</b>, red = brighter) and the per-voxel standard "
            "deviation over samples (<b>uncertainty</b>).</p>"
        ),
        f"<p><small>settings: {html.escape(json.dumps(params, default=str))}</small></p>",
    ]
    for entry in sorted(done, key=lambda e: e["key"]):
        parts.append(_scan_section(output_root, entry))
    if failed:
        parts.append(
            "<div class='scan'><h2 class='failed'>failed scans</h2><table><tr><th>scan</th><th>error</th></tr>"
        )
        for entry in sorted(failed, key=lambda e: e["key"]):
            parts.append(
                f"<tr><td>{html.escape(entry['key'])}</td><td>{html.escape(str(entry.get('error')))}</td></tr>"
            )
        parts.append("</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _scan_section(output_root: Path, entry: dict[str, Any]) -> str:
    head = (
        f"<div class='scan'><h2>{html.escape(entry['key'])}</h2>"
        f"<div>{html.escape(str(entry.get('kind')))} · task {html.escape(str(entry.get('task')))} · "
        f"{float(entry.get('seconds') or 0):.1f} s</div>"
    )
    try:
        slices = scan_slices(output_root, entry)
        images = panel_images(slices) if slices else {}
    except Exception as exc:  # noqa: BLE001 - an unreadable output shows as text, the report still renders
        images = {}
        head += f"<p class='failed'>preview unavailable: {html.escape(type(exc).__name__)}</p>"
    captions = {
        "before": BEFORE.get(str(entry.get("task")), "before"),
        "after": "after: enhanced",
        "difference": "after − before",
        "uncertainty": "uncertainty (SD over samples)",
    }
    figs = "".join(
        f"<figure><img alt='{name}' src='data:image/png;base64,{_png_base64(img)}'>"
        f"<figcaption>{html.escape(captions[name])}</figcaption></figure>"
        for name, img in images.items()
    )
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{'-' if v is None else f'{v:.4g}'}</td></tr>"
        for k, v in sorted((entry.get("metrics") or {}).items())
    )
    return f"{head}<div class='panels'>{figs}</div><table><tr><th>metric</th><th>value</th></tr>{rows}</table></div>"


def write_report(output_root: Path, manifest: dict[str, Any], path: Path | None = None) -> Path:
    """Write the report (atomically) to ``path`` or ``OUT/report.html``."""
    from medidiff.io.atomic import atomic_file

    path = Path(path) if path else Path(output_root) / "report.html"
    text = render_report(Path(output_root), manifest)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

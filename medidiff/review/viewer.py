"""Interactive review of one enhanced scan in a notebook (ipywidgets), and its static counterpart.

The viewer shows before / enhanced / difference / uncertainty for one slice, with a slice slider, the view
(axial / coronal / sagittal), one window/level shared by the anatomy panels, an overlay of high-uncertainty
voxels, the scan's metrics, and an export of the current view to PNG. It renders with matplotlib into PNG
bytes shown in an ``ipywidgets.Image``, so it needs no interactive matplotlib backend and also works when a
notebook is executed headless. :func:`static_review` draws the middle slices of every view, non-interactively.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medidiff.review.batch import ScanOutputs
from medidiff.review.figures import (
    CONVENTIONS,
    VIEWS,
    DisplayLimits,
    _sample,
    canonical,
    check_same_grid,
    display_limits,
    figure_png,
    format_metrics,
    middle_slices_figure,
    scan_figure,
    useful_views,
    write_png,
)


def _safe_name(text: str) -> str:
    """A file-name-safe version of a scan key."""
    text = re.sub(r"\.(nii\.gz|nii|h5|hdf5|dcm)$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"


def metrics_html(metrics: dict[str, Any], title: str = "metrics") -> str:
    """The scan's metrics as a small HTML table."""
    rows = []
    for name, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
        rows.append(f"<tr><td style='padding:0 1em 0 0'>{html.escape(str(name))}</td>"
                    f"<td style='text-align:right'>{html.escape(shown)}</td></tr>")
    body = "".join(rows) or "<tr><td>none recorded</td></tr>"
    return f"<b>{html.escape(title)}</b><table>{body}</table>"


class ReviewViewer:
    """An ipywidgets viewer for one scan.

    Display it as a notebook cell's last expression, or ``viewer.widget``.
    """

    def __init__(
        self, scan: ScanOutputs, *, view: str = "axial", convention: str = "radiological",
        overlay_percentile: float = 95.0, export_dir: str | os.PathLike[str] = ".", dpi: int = 80,
        export_dpi: int = 150,
    ) -> None:
        import ipywidgets as w

        views = useful_views(scan.enhanced)
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
        view = view if view in views else views[0]
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        check_same_grid(
            {"enhanced": scan.enhanced, "baseline": scan.baseline, "uncertainty": scan.uncertainty}
        )
        self.scan = scan
        self.convention = convention
        self.dpi = dpi
        self.export_dpi = export_dpi
        self.export_dir = Path(export_dir)
        self._before = canonical(scan.baseline)
        self._enhanced = canonical(scan.enhanced)
        self._uncertainty = canonical(scan.uncertainty) if scan.uncertainty is not None else None
        self._sd_sample = _sample(self._uncertainty.array) if self._uncertainty is not None else None
        self._auto = display_limits(self._before, self._enhanced, self._uncertainty,
                                    overlay_percentile=overlay_percentile)
        vmin, vmax = self._auto.anatomy_range
        span = max(vmax - vmin, 1e-6)
        lo = float(min(self._enhanced.array.min(), self._before.array.min()))
        hi = float(max(self._enhanced.array.max(), self._before.array.max()))

        self.view = w.ToggleButtons(options=list(views), value=view, description="view")
        self.slice = w.IntSlider(description="slice", min=0, max=1, value=0, continuous_update=False)
        self.window = w.FloatSlider(description="window", min=span / 100, max=max(2 * (hi - lo), span),
                                    value=self._auto.window, step=span / 200, continuous_update=False,
                                    readout_format=".4g")
        self.level = w.FloatSlider(description="level", min=lo, max=max(hi, lo + span),
                                   value=self._auto.level, step=span / 200, continuous_update=False,
                                   readout_format=".4g")
        self.reset = w.Button(description="reset window/level", tooltip="robust 0.5-99.5 % range of the scan")
        has_sd = self._uncertainty is not None
        self.overlay = w.Checkbox(value=has_sd, disabled=not has_sd, description="highlight high uncertainty")
        self.percentile = w.FloatSlider(description="above pct", min=50.0, max=99.9, step=0.1,
                                        value=overlay_percentile, disabled=not has_sd,
                                        continuous_update=False)
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.metrics = w.HTML(metrics_html(scan.metrics, f"scan {scan.key} · task {scan.task or '?'}"))
        self.export_name = w.Text(description="PNG file", value="", layout=w.Layout(width="28em"))
        self.export_button = w.Button(description="export view to PNG", icon="download")
        self.status = w.HTML()

        self._hold = False
        self._update_slice_range(middle=True)
        self.view.observe(self._on_view, names="value")
        for control in (self.slice, self.window, self.level, self.overlay, self.percentile):
            control.observe(lambda _change: self.refresh(), names="value")
        self.reset.on_click(lambda _b: self.reset_window())
        self.export_button.on_click(lambda _b: self._on_export())

        controls = w.VBox([self.view, self.slice, w.HBox([self.window, self.level, self.reset]),
                           w.HBox([self.overlay, self.percentile])])
        export = w.HBox([self.export_name, self.export_button, self.status])
        self.widget = w.VBox([controls, self.image, w.HBox([self.metrics]), export])
        self.refresh()

    # -------------------------------------------------------------------------------- state and drawing
    def _update_slice_range(self, middle: bool) -> None:
        count = self._enhanced.shape[{"axial": 2, "coronal": 1, "sagittal": 0}[self.view.value]]
        self._hold = True
        try:
            self.slice.max = count - 1
            if middle or self.slice.value > count - 1:
                self.slice.value = count // 2
        finally:
            self._hold = False
        self.export_name.value = self.default_export_name()

    def _on_view(self, _change: Any) -> None:
        self._update_slice_range(middle=True)
        self.refresh()

    def reset_window(self) -> None:
        """Back to the automatic window/level."""
        self._hold = True
        try:
            self.window.value, self.level.value = self._auto.window, self._auto.level
        finally:
            self._hold = False
        self.refresh()

    @property
    def limits(self) -> DisplayLimits:
        """Current display limits (window/level and overlay threshold from the controls)."""
        threshold = None
        if self._sd_sample is not None:
            threshold = float(np.percentile(self._sd_sample, self.percentile.value))
        return DisplayLimits(
            window=float(self.window.value), level=float(self.level.value),
            difference_max=self._auto.difference_max, uncertainty_max=self._auto.uncertainty_max,
            uncertainty_threshold=threshold,
            overlay_percentile=float(self.percentile.value) if threshold is not None else None,
        )

    def figure(self, dpi: int | None = None) -> Figure:
        """The current view as a matplotlib Figure."""
        return scan_figure(
            self._before, self._enhanced, self._uncertainty, view=self.view.value,
            index=int(self.slice.value), limits=self.limits, overlay=bool(self.overlay.value),
            convention=self.convention,
            before_label=self.scan.before_label, title=f"scan {self.scan.key} · task {self.scan.task or '?'}",
            dpi=dpi or self.dpi,
        )

    def refresh(self) -> None:
        """Redraw the current view into the image widget."""
        if self._hold:
            return
        self.image.value = figure_png(self.figure())
        self.export_name.value = self.default_export_name()

    def default_export_name(self) -> str:
        """review_<key>_<view>_<slice>.png (scan keys carry no patient data)."""
        return f"review_{_safe_name(self.scan.key)}_{self.view.value}_{int(self.slice.value):03d}.png"

    def export_png(self, path: str | os.PathLike[str] | None = None, dpi: int | None = None) -> Path:
        """Write the current view (with its title, metrics and colour bars) as a PNG; returns the path."""
        target = Path(path) if path is not None else self.export_dir / self.default_export_name()
        fig = self.figure(dpi=dpi or self.export_dpi)
        fig.suptitle(
            f"scan {self.scan.key} · task {self.scan.task or '?'}\n{format_metrics(self.scan.metrics)}",
            fontsize=10,
        )
        return write_png(fig, target)

    def _on_export(self) -> None:
        name = self.export_name.value.strip() or self.default_export_name()
        try:
            path = self.export_png(self.export_dir / name)
        except OSError as exc:
            self.status.value = f"<span style='color:#b00'>export failed: {html.escape(str(exc))}</span>"
        else:
            self.status.value = f"saved <code>{html.escape(str(path))}</code>"

    def set_view(self, view: str, index: int | None = None) -> ReviewViewer:
        """Switch view (and optionally slice) from code, as the controls would."""
        self.view.value = view
        if index is not None:
            self.slice.value = int(index)
        return self

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def static_review(
    scan: ScanOutputs, *, out_png: str | os.PathLike[str] | None = None, convention: str = "radiological",
    overlay_percentile: float = 95.0, dpi: int = 80,
) -> Figure:
    """Middle slices of the three views (before / enhanced / difference / uncertainty), no widgets needed."""
    fig = middle_slices_figure(
        scan.baseline, scan.enhanced, scan.uncertainty, convention=convention,
        overlay_percentile=overlay_percentile, before_label=scan.before_label,
        title=f"scan {scan.key} · task {scan.task or '?'}", metrics=scan.metrics, dpi=dpi,
    )
    if out_png is not None:
        write_png(fig, out_png)
    return fig

"""medidiff.review: look at a batch's results honestly (figures, a notebook viewer, MLflow run summaries).

Notebooks in ``notebooks/`` only call what is exported here.
"""

from medidiff.review.batch import (
    BEFORE_LABELS,
    Batch,
    BatchError,
    ScanEntry,
    ScanOutputs,
    load_volume,
    open_batch,
)
from medidiff.review.figures import (
    VIEWS,
    DisplayLimits,
    ReviewError,
    SliceView,
    canonical,
    display_limits,
    figure_png,
    middle_slices_figure,
    orientation_labels,
    oriented_slice,
    scan_figure,
    show,
    write_png,
)
from medidiff.review.viewer import ReviewViewer, metrics_html, static_review

__all__ = [
    "BEFORE_LABELS",
    "VIEWS",
    "Batch",
    "BatchError",
    "DisplayLimits",
    "ReviewError",
    "ReviewViewer",
    "ScanEntry",
    "ScanOutputs",
    "SliceView",
    "canonical",
    "display_limits",
    "figure_png",
    "load_volume",
    "metrics_html",
    "middle_slices_figure",
    "open_batch",
    "orientation_labels",
    "oriented_slice",
    "scan_figure",
    "show",
    "static_review",
    "write_png",
]

"""medidiff.review: look at a batch's results honestly (figures, a notebook viewer, MLflow run summaries).

Notebooks in ``notebooks/`` only call what is exported here and in :mod:`medidiff.review.runs` (MLflow
reading, running the ``medidiff`` command, recipes and example runs).
"""

from medidiff.review.batch import (
    BEFORE_LABELS,
    Batch,
    BatchError,
    ScanEntry,
    ScanOutputs,
    demo_output,
    load_volume,
    open_batch,
    trust_summary,
)
from medidiff.review.figures import (
    VIEWS,
    DisplayLimits,
    ReviewError,
    SliceView,
    canonical,
    display_limits,
    figure_png,
    flags_figure,
    middle_slices_figure,
    orientation_labels,
    oriented_slice,
    scan_figure,
    show,
    useful_views,
    write_png,
)
from medidiff.review.project import find_project_root
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
    "demo_output",
    "display_limits",
    "figure_png",
    "find_project_root",
    "flags_figure",
    "load_volume",
    "metrics_html",
    "middle_slices_figure",
    "open_batch",
    "orientation_labels",
    "oriented_slice",
    "scan_figure",
    "show",
    "static_review",
    "trust_summary",
    "useful_views",
    "write_png",
]

"""What the run-comparison and training notebooks call, in one namespace.

Import it as ``from medidiff.review import runs``.

Reading MLflow runs as tables and figures (:mod:`~medidiff.review.charts`), running the ``medidiff`` command
(:mod:`~medidiff.review.command`), finding the checkout and its store (:mod:`~medidiff.review.project`),
training recipes (:mod:`~medidiff.review.recipes`) and example runs and scans
(:mod:`~medidiff.review.examples`).
"""

from medidiff.review.charts import (
    curve_metrics,
    evaluation_table,
    latest_run_id,
    list_runs,
    pd_notna,
    quality_vs_steps,
    read_evaluation_report,
    step_sweep,
    training_curves,
)
from medidiff.review.command import CommandError, run_medidiff
from medidiff.review.examples import (
    ensure_example_runs,
    example_scan_folder,
    find_checkpoint,
    shipped_model_available,
    stage_inputs,
)
from medidiff.review.project import default_tracking_uri, find_project_root, workspace
from medidiff.review.recipes import recipe_path, training_recipe

__all__ = [
    "CommandError",
    "curve_metrics",
    "default_tracking_uri",
    "ensure_example_runs",
    "evaluation_table",
    "example_scan_folder",
    "find_checkpoint",
    "find_project_root",
    "latest_run_id",
    "list_runs",
    "pd_notna",
    "quality_vs_steps",
    "read_evaluation_report",
    "recipe_path",
    "run_medidiff",
    "shipped_model_available",
    "stage_inputs",
    "step_sweep",
    "training_curves",
    "training_recipe",
    "workspace",
]

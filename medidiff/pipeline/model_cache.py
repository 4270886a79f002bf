"""The models of a batch worker.

Each task's model is loaded once per process, with its identity for the records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from medidiff.models import default_model, load_model


class ModelCache:
    """Loads each task's model once per process (one model per Ray actor), on the GPU when there is one.

    Each of ``models`` (checkpoint folders or shipped names) replaces the shipped default for the task its
    recipe was trained for; other tasks keep their shipped defaults.
    """

    def __init__(self, models: tuple[str, ...] | list[str] | str | None = (), device: str = "auto") -> None:
        if isinstance(models, str):
            models = (models,)
        self.requested = tuple(models or ())
        self.device = device
        self._models: dict[str, Any] = {}
        self._custom: dict[str, Any] | None = None

    def resolved_device(self) -> str:
        """'cuda' when asked for, or on 'auto' when a GPU is visible; else 'cpu'."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def get(self, task: str) -> Any:
        """The model for ``task`` (loaded on first use)."""
        if task not in self._models:
            if self._custom is None:
                self._custom = {}
                for ref in self.requested:
                    loaded = load_model(ref, device=self.resolved_device())
                    self._custom[loaded.task] = loaded
            self._models[task] = self._custom.get(task) or default_model(task, device=self.resolved_device())
        return self._models[task]

    def identities(self) -> dict[str, dict[str, str]]:
        """:func:`model_identity` of every model loaded so far, by task."""
        return {task: model_identity(model, task) for task, model in self._models.items()}


def model_identity(model: Any, task: str) -> dict[str, str]:
    """Name, folder and weights digest of a loaded model, for the manifest params and MLflow."""
    ident = {"task": task, "name": str(getattr(model, "name", "?"))}
    path = getattr(model, "path", None)
    if path is not None:
        ident["path"] = Path(path).name
        weights = Path(path) / "model.safetensors"
        if weights.is_file():
            with open(weights, "rb") as fh:
                ident["weights_sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    return ident

"""Small networks with perturbed weights for pipeline tests, and the smoke recipe they are built from."""

from __future__ import annotations

from pathlib import Path

import torch

from medidiff.models import build_model, load_model, save_checkpoint

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


def perturbed_model(recipe, folder: Path, scale: float, seed: int = 1):
    """A network of ``recipe`` (seeded init) with ``scale`` x N(0, 1) added to every weight, saved and loaded.

    A small scale gives an untrained network a non-trivial output (MONAI zero-initialises the last conv);
    a large one (0.5) makes structured noise: a model made to hurt.
    """
    torch.manual_seed(0)
    net = build_model(recipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return load_model(save_checkpoint(folder, net, recipe))

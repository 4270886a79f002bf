"""Run reconstruction / super-resolution methods side by side on the same inputs and score them.

A ``Case`` is one held-out scan: its reference image and the degraded input (a low-resolution
``Volume`` for SR, ``KSpaceData`` for reconstruction). Cases come from a folder written by
``medidiff simulate`` or from the shipped real evaluation volumes simulated on the fly with the same
physics operators. Every method maps a case to an image on the reference grid; ``evaluate`` scores them
all with the fastMRI-convention metrics and returns one row per (scan, method).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.baselines.interpolation import plane_axes_from_shapes, upsample_volume
from medidiff.baselines.recon import DEFAULT_CS_ITERS, _calib_width, compressed_sensing, zero_filled
from medidiff.baselines.unet import load_unet, unet_enhance_kspace, unet_enhance_volume
from medidiff.data.shipped import real_evaluation_volumes, real_training_volumes
from medidiff.data.synth import synth_subject
from medidiff.evaluation.tuning import tune_cs_lambda
from medidiff.io.kspace import KSpaceData, read_kspace
from medidiff.io.nifti import read_nifti
from medidiff.io.volume import Volume
from medidiff.metrics import all_metrics, psnr
from medidiff.models import default_model, load_model
from medidiff.physics.fft import fft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import KSpaceTruncation
from medidiff.physics.simulate import simulate_recon

__all__ = [
    "RECON_ACCELERATION",
    "RECON_CENTER_FRACTION",
    "SR_FACTOR",
    "Case",
    "EvaluationError",
    "Method",
    "build_methods",
    "cs_tuning_set",
    "evaluate_cases",
    "load_cases",
    "panel_cases",
    "shipped_cases",
    "summarise",
]

SR_FACTOR = 2
RECON_ACCELERATION = 4.0
RECON_CENTER_FRACTION = 0.08
RECON_MASK_KIND = "equispaced"
SR_THICK_FACTOR = 4
TASKS = ("sr", "sr_thick", "recon")
PANELS = ("heldout", "ood")
MAX_SLICES = 8
CLASSICAL = {"sr": ("sinc", "bicubic"), "sr_thick": ("linear", "cubic"), "recon": ("zero-filled", "cs")}
OOD_PIXEL_MM = (0.3, 2.0)  # pixel sizes the models never saw
OOD_MAX_SIZE = 256  # resampled / natural images are centre-cropped to at most this many pixels a side
METRIC_KEYS = ("psnr", "ssim", "nmse", "hfen")


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message names the file and the problem."""


@dataclass
class Case:
    """One held-out scan: reference plus degraded input (``lr`` for SR, ``kspace`` for recon)."""
    name: str
    reference: Volume
    lr: Volume | None = None
    kspace: Any = None  # KSpaceData
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sr_axes(self) -> tuple[int, ...]:
        """The array axes that were downsampled (SR) — inferred from the shapes."""
        return plane_axes_from_shapes(self.lr.shape, self.reference.shape)[0]

    @property
    def sr_factor(self) -> int:
        """The SR factor inferred from the shapes."""
        return plane_axes_from_shapes(self.lr.shape, self.reference.shape)[1]

    @property
    def slice_axis(self) -> int:
        """Axis holding the 2D slices for SSIM / HFEN: the one SR did not touch; last for k-space data."""
        if "slice_axis" in self.info:
            return int(self.info["slice_axis"])
        if self.lr is None:
            return 2
        axes = self.sr_axes
        return next(a for a in range(3) if a not in axes) if len(axes) == 2 else axes[0]


@dataclass
class Method:
    """A named method: ``run(case) -> (image Volume on the reference grid, extra numbers)``."""
    name: str
    run: Callable[[Case], tuple[Volume, dict[str, float]]]
    family: str = "baseline"  # 'baseline' | 'learned' | 'medidiff'
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- cases


def load_cases(data_dir: str | Path, task: str) -> list[Case]:
    """Pair inputs with references in a folder.

    ``<stem>_lr.nii.gz`` (sr) or ``<stem>_kspace.h5`` (recon) with ``<stem>_ref.nii.gz``.
    """
    root = Path(data_dir)
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not root.is_dir():
        raise EvaluationError(f"{root}: not a folder (expected the output of `medidiff simulate`)")
    suffix = "_kspace.h5" if task == "recon" else "_lr.nii.gz"
    inputs = sorted(root.rglob(f"*{suffix}"))
    if not inputs:
        raise EvaluationError(
            f"{root}: no '*{suffix}' inputs for task {task!r} (run `medidiff simulate --task {task}`)"
        )
    cases = []
    for inp in inputs:
        stem = inp.name[: -len(suffix)]
        ref_path = inp.with_name(f"{stem}_ref.nii.gz")
        if not ref_path.is_file():
            raise EvaluationError(f"{inp}: no matching reference {ref_path.name} beside it")
        reference = read_nifti(ref_path)
        name = str(inp.relative_to(root).with_name(stem))
        if task != "recon":
            lr = read_nifti(inp)
            case = Case(name=name, reference=reference, lr=lr)
            try:
                case.sr_axes  # noqa: B018  (validates the shapes)
            except ValueError as exc:
                raise EvaluationError(f"{inp}: {exc}") from None
        else:

            data = read_kspace(inp)
            if data.image_shape != reference.shape:
                raise EvaluationError(
                    f"{inp}: k-space image shape {data.image_shape} differs from reference {reference.shape}"
                )
            case = Case(name=name, reference=reference, kspace=data)
        cases.append(case)
    return cases


def degrade_sr_inplane(vol: Volume, factor: int = SR_FACTOR) -> tuple[Volume, Volume]:
    """(low-res, reference): axes 0 and 1 cropped to a multiple of ``factor``, then k-space truncated
    per slice.

    The same operator and grid convention as ``physics.simulate.simulate_sr(axis='inplane')`` and
    ``enhance_volume(task='sr')``: slices along axis 2, LR sample ``i`` at HR sample ``f·i``.
    """
    import torch


    h, w = (vol.shape[0] // factor) * factor, (vol.shape[1] // factor) * factor
    ref = vol.with_array(np.ascontiguousarray(vol.array[:h, :w]))
    stack = torch.from_numpy(np.ascontiguousarray(np.moveaxis(ref.array, 2, 0)))
    lr = np.moveaxis(KSpaceTruncation(factor).A(stack).numpy(), 0, 2)
    affine = ref.affine @ np.diag([float(factor), float(factor), 1.0, 1.0])
    return ref.with_array(np.ascontiguousarray(lr, dtype=np.float32), affine), ref


def degrade_recon(
    vol: Volume, acceleration: float = RECON_ACCELERATION, center_fraction: float = RECON_CENTER_FRACTION,
    mask_kind: str = RECON_MASK_KIND, seed: int = 0,
) -> tuple[Any, Volume]:
    """(single-coil KSpaceData, reference): each slice along axis 2 Fourier transformed and masked."""
    stack = np.moveaxis(vol.array, 2, 0)
    mask = make_mask(mask_kind, stack.shape[1:], acceleration, center_fraction, seed)
    ksp = (fft2c_np(stack) * mask.full()).astype(np.complex64)
    meta = {"acceleration": mask.acceleration, "center_fraction": center_fraction, "mask_kind": mask_kind}
    return KSpaceData(ksp, mask.mask, vol.affine, meta=meta), vol


def shipped_cases(task: str, seed: int = 0) -> list[Case]:
    """The held-out real evaluation volumes, degraded on the fly.

    SR ×2 truncation; recon ×4 equispaced 8 %.
    """
    cases = []
    for i, (name, vol) in enumerate(real_evaluation_volumes()):
        if task == "sr":
            lr, ref = degrade_sr_inplane(vol, SR_FACTOR)
            cases.append(Case(name=name, reference=ref, lr=lr))
        else:
            data, ref = degrade_recon(vol, seed=seed + i)
            cases.append(Case(name=name, reference=ref, kspace=data))
    return cases


def _spread(n: int, count: int | None) -> np.ndarray:
    """Up to ``count`` indices evenly spread over ``range(n)`` (all when ``count`` is None or 0)."""
    if not count or n <= count:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, count).round().astype(int))


def slice_images(vol: Volume, max_slices: int | None) -> list[tuple[int, np.ndarray, float]]:
    """``(index, 2D image, in-plane pixel mm)`` of up to ``max_slices`` slices along the volume's slice axis
    (slices with no signal are skipped)."""
    ax = vol.slice_axis
    arr = np.moveaxis(np.asarray(vol.array, np.float32), ax, 0)
    sp = [s for i, s in enumerate(vol.spacing) if i != ax]
    energy = np.abs(arr).reshape(len(arr), -1).mean(axis=1)
    keep = np.flatnonzero(energy > 0.1 * energy.max()) if energy.max() > 0 else np.arange(0)
    return [(int(keep[i]), arr[keep[i]], float(np.mean(sp))) for i in _spread(len(keep), max_slices)]


def image_case(task: str, name: str, image: np.ndarray, pixel_mm: float, seed: int = 0,
               info: dict[str, Any] | None = None) -> Case:
    """One 2D image as a case of ``task``: ``sr`` k-space truncation x2; ``sr_thick`` its second axis taken
    as the slice direction and thickened x4 by the slice profile (the Volume is (1, H, W), axis 2 thick);
    ``recon`` x4 equispaced with an 8 % centre."""
    from medidiff.physics.simulate import simulate_sr

    img = np.ascontiguousarray(image, np.float32)
    info = dict(info or {})
    if task == "sr":
        vol = Volume(img[:, :, None], np.diag([pixel_mm, pixel_mm, pixel_mm, 1.0]), {"modality": "MR"})
        lr, ref = degrade_sr_inplane(vol, SR_FACTOR)
        return Case(name=name, reference=ref, lr=lr, info=info)
    if task == "sr_thick":
        w = img.shape[1] - img.shape[1] % SR_THICK_FACTOR
        vol = Volume(img[None, :, :w], np.diag([pixel_mm, pixel_mm, pixel_mm, 1.0]), {"modality": "MR"})
        lr, ref = simulate_sr(vol, SR_THICK_FACTOR, axis="through", seed=seed)
        info["slice_axis"] = 0
        return Case(name=name, reference=ref, lr=lr, info=info)
    vol = Volume(img[:, :, None], np.diag([pixel_mm, pixel_mm, pixel_mm, 1.0]), {"modality": "MR"})
    data, ref = degrade_recon(vol, seed=seed)
    return Case(name=name, reference=ref, kspace=data, info=info)


def _centre_crop(img: np.ndarray, size: int = OOD_MAX_SIZE) -> np.ndarray:
    h, w = img.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(img[top: top + size, left: left + size])


def ood_images(
    max_slices: int | None = 2, seed: int = 0
) -> list[tuple[str, np.ndarray, float, dict[str, Any]]]:
    """The out-of-domain panel as ``(name, image, pixel mm, info)``: the held-out natural images and
    phantom as magnitude images with Rician noise (and sometimes a scanner-masked zero background), and
    held-out real MR slices resampled to pixel sizes the models never saw (``OOD_PIXEL_MM``)."""
    from scipy.ndimage import zoom

    from medidiff.data.generators import AcquisitionConfig, acquire
    from medidiff.data.natural import natural_images

    out = []
    rng = np.random.default_rng(seed)
    for name, img in natural_images("ood"):
        clean = _centre_crop(np.asarray(img, np.float32))
        noisy, params = acquire(clean, clean > 0.05, rng, AcquisitionConfig())
        info = {"panel": "ood", "source": "natural", "snr": params["snr"]}
        out.append((f"natural/{name}", noisy, 1.0, info))
    for vol_name, vol in real_evaluation_volumes():
        for idx, img, mm in slice_images(vol, max_slices):
            for target in OOD_PIXEL_MM:
                z = mm / target
                res = np.clip(zoom(img, z, order=3, grid_mode=True, mode="grid-constant"), 0, None)
                res = _centre_crop(res.astype(np.float32))
                if min(res.shape) < 16:
                    continue
                out.append((f"{vol_name}/s{idx}@{target:g}mm", res, target,
                            {"panel": "ood", "source": "resampled", "zoom": z}))
    return out


def panel_cases(
    task: str, panel: str = "heldout", max_slices: int | None = MAX_SLICES, seed: int = 0
) -> list[Case]:
    """Cases of a panel, one per 2D slice.

    ``heldout``: every shipped real MR volume no model trained on (up to ``max_slices`` slices each,
    evenly spread); ``ood``: the out-of-domain panel (:func:`ood_images`).
    """
    if panel not in PANELS:
        raise EvaluationError(f"unknown panel {panel!r}; choose one of {', '.join(PANELS)}")
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if panel == "heldout":
        items = [(f"{name}/s{idx}", img, mm, {"panel": "heldout", "source": name})
                 for name, vol in real_evaluation_volumes() for idx, img, mm in slice_images(vol, max_slices)]
    else:
        items = ood_images(max(1, (max_slices or MAX_SLICES) // 4), seed)
    cases = []
    for k, (name, img, mm, info) in enumerate(items):
        min_side = SR_THICK_FACTOR * 4 if task == "sr_thick" else 8
        if min(img.shape) < min_side:
            continue
        cases.append(image_case(task, name, img, mm, seed + k, info))
    return cases


def _take_slices(vol: Volume, count: int) -> Volume:
    """``count`` central slices along the volume's slice axis (affine shifted to match)."""
    ax = vol.slice_axis
    n = vol.shape[ax]
    start = max(0, n // 2 - count // 2)
    stop = min(n, start + count)
    index = [slice(None)] * 3
    index[ax] = slice(start, stop)
    shift = np.eye(4)
    shift[ax, 3] = start
    return vol.with_array(np.ascontiguousarray(vol.array[tuple(index)]), vol.affine @ shift)


def _mask_settings(data) -> tuple[float, float, str]:
    """(acceleration, centre fraction, mask kind) of a KSpaceData, from its metadata or its mask."""
    meta = dict(getattr(data, "meta", {}) or {})
    accel = meta.get("acceleration")
    cf = meta.get("center_fraction")
    kind = str(meta.get("mask_kind", RECON_MASK_KIND))
    if data.mask is not None and (accel is None or cf is None):

        w = data.kspace.shape[-1]
        full = np.broadcast_to(data.mask, data.kspace.shape[-2:])
        accel = accel or float(full.size / max(full.sum(), 1))
        cf = cf or float(_calib_width(full) / w)
    return float(accel or RECON_ACCELERATION), float(cf or RECON_CENTER_FRACTION), kind


def _tuning_volumes(n_volumes: int, seed: int) -> list[Volume]:
    """Real training volumes (never the evaluation set) topped up with synthetic subjects."""
    vols = [v for _, v in real_training_volumes()]
    vols = [v for v in vols if min(s for i, s in enumerate(v.shape) if i != v.slice_axis) >= 64]
    if len(vols) < n_volumes:

        vols += [synth_subject(seed + k) for k in range(n_volumes - len(vols))]
    return vols[:n_volumes]


def cs_tuning_set(
    like, n_volumes: int = 2, slices_per_volume: int = 2, seed: int = 1000,
    volumes: Sequence[Volume] | None = None,
) -> list[tuple[Any, np.ndarray]]:
    """A held-in λ tuning set: training volumes (never evaluation scans) degraded like ``like``.

    ``like`` is the KSpaceData of an evaluation case; its acceleration, centre fraction and mask kind are
    reused (single coil; multi-coil data goes through ``physics.simulate.simulate_recon``). ``volumes``
    replaces the default pool (real training volumes, then synthetic subjects). Returns
    ``(KSpaceData, reference (H, W, S))`` pairs.
    """

    accel, cf, kind = _mask_settings(like)
    coils = int(like.kspace.shape[1]) if like.kspace.ndim == 4 else 1
    vols = list(volumes) if volumes is not None else _tuning_volumes(n_volumes, seed)
    pairs = []
    for k, vol in enumerate(vols):
        part = _take_slices(vol, slices_per_volume)
        if coils > 1:

            data, ref = simulate_recon(part, accel, cf, kind, coils, seed + k)
            pairs.append((data, ref.array))
            continue
        stack = np.moveaxis(part.array, part.slice_axis, 0)  # (S, H, W)
        mask = make_mask(kind, stack.shape[1:], accel, cf, seed + k)
        ksp = (fft2c_np(stack) * mask.full()).astype(np.complex64)
        pairs.append((KSpaceData(ksp, mask.mask, np.eye(4)), np.moveaxis(stack, 0, -1)))
    return pairs


# --------------------------------------------------------------------------------------------- methods


def _sr_baseline(kind: str) -> Callable[[Case], tuple[Volume, dict[str, float]]]:
    """Sinc or bicubic in-plane upsampling of the case's low-resolution volume."""
    def run(case: Case) -> tuple[Volume, dict[str, float]]:
        if len(case.sr_axes) != 2:
            raise EvaluationError(
                f"{case.name}: {kind} needs in-plane (two-axis) SR data, got axes {case.sr_axes}"
            )
        return upsample_volume(case.lr, case.sr_factor, case.sr_axes, method=kind), {}

    return run


def slice_interpolate(lr: Volume, factor: int, order: int) -> Volume:
    """Linear (``order`` 1) or cubic (3) interpolation of thick slices along the LR volume's slice axis
    onto the thin grid: thin slice ``j`` sits at thick index ``(j - (f - 1) / 2) / f`` (the slice-profile
    convention), edges clamped."""
    from scipy.ndimage import map_coordinates

    from medidiff.physics.simulate import hr_affine

    ax = lr.slice_axis
    arr = np.moveaxis(np.asarray(lr.array, np.float32), ax, -1)
    n = arr.shape[-1]
    pos = np.clip((np.arange(n * factor) - (factor - 1) / 2) / factor, 0, n - 1)
    flat = arr.reshape(-1, n)
    rows = np.arange(len(flat))
    coords = np.stack(np.meshgrid(rows, pos, indexing="ij"))
    out = map_coordinates(flat, coords, order=order, mode="nearest", prefilter=order > 1)
    out = np.moveaxis(out.reshape(*arr.shape[:-1], n * factor), -1, ax).astype(np.float32)
    return lr.with_array(np.ascontiguousarray(out), hr_affine(lr.affine, factor, (ax,), centred=True))


def _thick_baseline(kind: str) -> Callable[[Case], tuple[Volume, dict[str, float]]]:
    """Linear or cubic slice interpolation of the case's thick-slice volume."""
    order = {"linear": 1, "cubic": 3}[kind]

    def run(case: Case) -> tuple[Volume, dict[str, float]]:
        return slice_interpolate(case.lr, case.sr_factor, order), {}

    return run


def _unet_method(model_dir: str | Path, task: str, device: str) -> Method:
    """The regression U-Net checkpoint in ``model_dir``: one forward pass from the back-projection."""
    model = load_unet(model_dir, device=device)
    if model.task != task:
        raise EvaluationError(
            f"{model_dir}: regression U-Net was trained for task {model.task!r}, not {task!r}"
        )

    def run(case: Case) -> tuple[Volume, dict[str, float]]:
        if task == "sr":
            _check_inplane(case)
            return unet_enhance_volume(model, case.lr), {"network_evals": 1.0}
        return unet_enhance_kspace(model, case.kspace), {"network_evals": 1.0}

    return Method("unet", run, family="learned",
                  params={"unet_dir": str(model_dir), "unet_steps": model.meta.get("steps_done"),
                          "unet_data_fingerprint": model.meta.get("data_fingerprint", "unknown")})


def _check_inplane(case: Case) -> None:
    """Learned SR methods work on slices along axis 2: the LR volume must be downsampled on axes 0 and 1."""
    if case.sr_axes != (0, 1):
        raise EvaluationError(
            f"{case.name}: in-plane SR expects axes 0 and 1 downsampled, got {case.sr_axes}"
        )


def _without_dc(func: Callable, model: Any) -> tuple[Any, dict[str, Any]]:
    """(model, extra kwargs) that run ``enhance_*`` without data consistency.

    Uses a ``dc`` keyword of ``enhance_*`` when it has one; otherwise the model's recipe is copied with
    ``diffusion.dc = "none"`` (the sampler reads its DC mode from the recipe), leaving the weights alone.
    """
    params = inspect.signature(func).parameters
    for name in ("dc", "data_consistency", "dc_mode"):
        if name in params:
            annotation = str(params[name].annotation)
            return model, {name: False if annotation in ("bool", "<class 'bool'>") else "none"}
    recipe = getattr(model, "recipe", None)
    if recipe is None or not hasattr(recipe, "diffusion") or not hasattr(recipe.diffusion, "dc"):
        raise EvaluationError(f"{func.__module__}.{func.__name__} has no switch for data consistency")
    no_dc = dataclasses.replace(recipe, diffusion=dataclasses.replace(recipe.diffusion, dc="none"))
    return dataclasses.replace(model, recipe=no_dc), {}


def _medidiff_method(func: Callable, task: str, model: Any, steps: int, dc: bool, seed: int,
                     adapt: bool = False, adapt_seconds: float | None = None,
                     self_ensemble: int | None = None) -> Method:
    """medidiff (``func``: ``enhance_volume`` for sr / sr_thick, ``enhance_kspace`` for recon) at ``steps``
    steps, with or without DC, with or without per-scan adaptation, with the model's self-ensemble or
    ``self_ensemble`` flipped copies (through-plane SR; the name then ends in ``-se<N>``). Besides the
    image, it reports the gate's numbers and ``actual_gain_db``: the PSNR gain over the operator's
    back-projection of the candidate the gate weighed (what enhancing would have given)."""
    extra: dict[str, Any] = {"keep_candidate": True}
    if self_ensemble is not None:
        if task != "sr_thick":
            raise EvaluationError(f"a self-ensemble is for through-plane SR (sr_thick), not {task!r}")
        extra["self_ensemble"] = int(self_ensemble)
    if not dc:
        model, dc_extra = _without_dc(func, model)
        extra.update(dc_extra)
    # explicit either way: the plain method is the model alone, whatever the model's default
    extra.update(adapt=adapt, adapt_seconds=adapt_seconds if adapt else None)

    def run(case: Case) -> tuple[Volume, dict[str, Any]]:
        if task in ("sr", "sr_thick"):
            if task == "sr":
                _check_inplane(case)
            res = func(
                case.lr, task=task, model=model, factor=case.sr_factor, steps=steps, seed=seed, **extra
            )
        else:
            res = func(case.kspace, model=model, steps=steps, seed=seed, **extra)
        keep = ("network_evals", "dc_residual_rel", "residual_weight", "self_check_gain_db")
        numbers: dict[str, Any] = {k: float(v) for k, v in (res.metrics or {}).items()
                                   if (k in keep or k.startswith("adapt_")) and v is not None}
        numbers.update({k: v for k, v in (res.metrics or {}).items() if k.startswith("gate_")})
        if res.candidate is not None:
            ref = case.reference.array
            gain = _psnr(ref, res.candidate.array) - _psnr(ref, res.baseline.array)
            numbers["actual_gain_db"] = float(gain)
        return res.enhanced, numbers

    name = (f"medidiff-{steps}" + ("" if self_ensemble is None else f"-se{self_ensemble}")
            + ("" if dc else "-nodc") + ("-adapt" if adapt else ""))
    params: dict[str, Any] = {"steps": steps, "dc": dc, "adapt": adapt}
    if self_ensemble is not None:
        params["self_ensemble"] = int(self_ensemble)
    return Method(name, run, family="medidiff", params=params)


def _psnr(ref: np.ndarray, img: np.ndarray) -> float:
    """PSNR with the reference maximum as data range (as :func:`medidiff.metrics.all_metrics`)."""
    return float(psnr(ref, img))


def build_methods(
    task: str,
    cases: Sequence[Case],
    methods: Sequence[str] | None = None,
    *,
    steps: Sequence[int] = (4, 10),
    self_ensembles: Sequence[int] | None = None,
    model: str | Path | None = None,
    dc_variant: bool = True,
    adapt_variant: bool = True,
    adapt_seconds: float | None = None,
    unet_dir: str | Path | None = None,
    cs_lambda: float | None = None,
    cs_iters: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    notes: list[str] | None = None,
    enhance: Callable | None = None,
) -> list[Method]:
    """The requested methods for ``task`` (default: all available); unavailable ones are skipped with a note.

    ``enhance`` is medidiff's enhancement of a case's input (``medidiff.pipeline.enhance.enhance_volume`` for
    sr, ``enhance_kspace`` for recon), passed in because the pipeline sits above evaluation.
    """

    notes = [] if notes is None else notes
    available = [*CLASSICAL[task], "unet", "medidiff"]
    wanted = list(methods) if methods else list(available)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise EvaluationError(f"unknown method(s) {unknown} for task {task!r}; choose from {available}")
    out: list[Method] = []
    for name in wanted:
        if name in ("sinc", "bicubic"):
            out.append(Method(name, _sr_baseline(name)))
        elif name in ("linear", "cubic"):
            out.append(Method(name, _thick_baseline(name)))
        elif name == "zero-filled":
            out.append(Method(name, lambda c: (zero_filled(c.kspace), {})))
        elif name == "cs":
            iters = cs_iters or DEFAULT_CS_ITERS
            if cs_lambda is None:
                tuning = tune_cs_lambda(cs_tuning_set(cases[0].kspace), max_iter=iters)
                lam = tuning.lamda
                grid = ", ".join(f"{k:g}: {v:.2f} dB" for k, v in tuning.psnr_by_lambda.items())
                notes.append(f"CS lambda {lam:g} tuned on held-in training slices (mean PSNR {grid}; "
                             f"zero-filled {tuning.zero_filled_psnr:.2f} dB)")
            else:
                lam = float(cs_lambda)
                notes.append(f"CS lambda {lam:g} given on the command line")
            out.append(Method("cs",
                              lambda c, lam=lam, iters=iters: (compressed_sensing(c.kspace, lam, iters), {}),
                              params={"cs_lambda": lam, "cs_iters": iters}))
        elif name == "unet":
            path = Path(unet_dir) if unet_dir else _default_unet_dir(task)
            if path is None or not (path / "model.safetensors").is_file():
                notes.append(f"unet skipped: no regression U-Net checkpoint for {task!r} (train one with "
                             f"`python -m medidiff.baselines.unet --config pipelines/RECIPE.yaml --out DIR` "
                             f"and pass --unet DIR)")
                continue
            out.append(_unet_method(path, task, device))
        elif name == "medidiff":
            if enhance is None:
                notes.append("medidiff skipped: no enhance function given")
                continue
            try:
                loaded = _load_medidiff_model(task, model, device)
            except (ImportError, FileNotFoundError, KeyError, ValueError) as exc:
                notes.append(f"medidiff skipped: {type(exc).__name__}: {exc}")
                continue
            fp = (getattr(loaded, "meta", None) or {}).get("data_fingerprint")
            unet_fp = next((m.params.get("unet_data_fingerprint") for m in out if m.name == "unet"), None)
            if fp and unet_fp and fp != unet_fp:
                notes.append(f"the regression U-Net's training-data fingerprint ({unet_fp}) differs from the "
                             f"medidiff model's ({fp}): retrain one of them so both see the same data")
            for s in steps:
                for se in self_ensembles or (None,):
                    out.append(_medidiff_method(enhance, task, loaded, int(s), True, seed, self_ensemble=se))
                    if dc_variant:
                        try:
                            out.append(_medidiff_method(enhance, task, loaded, int(s), False, seed,
                                                        self_ensemble=se))
                        except EvaluationError as exc:
                            notes.append(f"medidiff without DC skipped: {exc}")
                    if adapt_variant:
                        out.append(_medidiff_method(enhance, task, loaded, int(s), True, seed, True,
                                                    adapt_seconds, self_ensemble=se))
    return out


def _default_unet_dir(task: str) -> Path | None:
    """``medidiff/weights/unet_<task>`` shipped with the package, if present."""
    path = Path(__file__).resolve().parents[1] / "weights" / f"unet_{task}"
    return path if path.is_dir() else None


def _load_medidiff_model(task: str, model: str | Path | None, device: str = "cpu") -> Any:
    """The diffusion model: ``load_model(model)`` or the shipped default for the task."""
    return load_model(model, device=device) if model else default_model(task, device=device)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_cases(
    cases: Sequence[Case],
    methods: Sequence[Method],
    progress: Callable[[str, str], None] | None = None,
    keep_outputs: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Volume]]]:
    """Run every method on every case; rows of metrics per (scan, method) and the output Volumes."""
    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, Volume]] = {}
    for case in cases:
        ref = case.reference
        outputs[case.name] = {}
        for method in methods:
            if progress is not None:
                progress(case.name, method.name)
            t0 = time.perf_counter()
            try:
                image, extra = method.run(case)
            except Exception as exc:  # noqa: BLE001 - one method failing on one scan is recorded, the rest go on
                error = f"{type(exc).__name__}: {exc}"
                rows.append({"scan": case.name, "method": method.name, "error": error})
                continue
            seconds = time.perf_counter() - t0
            if image.shape != ref.shape:
                rows.append({"scan": case.name, "method": method.name,
                             "error": f"output shape {image.shape} differs from reference {ref.shape}"})
                continue
            row: dict[str, Any] = {"scan": case.name, "method": method.name}
            row.update(all_metrics(ref.array, image.array, slice_axis=case.slice_axis))
            row["seconds"] = seconds
            row.update(extra)
            rows.append(row)
            if keep_outputs:
                outputs[case.name][method.name] = image
    return rows, outputs


def summarise(rows: Sequence[dict[str, Any]], method_order: Sequence[str]) -> list[dict[str, Any]]:
    """Mean of each metric per method over the scans it succeeded on (``n`` = scans, ``failed`` = errors)."""
    out = []
    for name in method_order:
        ok = [r for r in rows if r["method"] == name and "error" not in r]
        failed = sum(1 for r in rows if r["method"] == name and "error" in r)
        if not ok and not failed:
            continue
        row: dict[str, Any] = {"method": name, "n": len(ok), "failed": failed}
        for key in (*METRIC_KEYS, "seconds", "network_evals"):
            vals = [float(r[key]) for r in ok if key in r and np.isfinite(float(r[key]))]
            if vals:
                row[key] = float(np.mean(vals))
        out.append(row)
    return out

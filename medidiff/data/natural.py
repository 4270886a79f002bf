"""Natural-image structure as a generic edge/texture prior, from images shipped inside installed packages.

Only files that the packages install themselves are read (scikit-image's bundled subset of ``skimage.data``,
scikit-learn's ``load_sample_images`` files, matplotlib's ``mpl-data/sample_data``), straight from the package
folders, so nothing is ever downloaded (``skimage.data`` fetches the rest of its images with pooch).

Fixed split (by name, see ``OOD_NAMES``): the out-of-domain evaluation panel keeps a phantom, a classic
photograph, objects on a flat background, a texture and a flower; ``natural_images("train")`` never returns
them. The two motorcycle views are near-duplicates and both stay in training. Left out of both: images too
small for a patch (``microaneurysms``, ``lfw_subset``, matplotlib's 128x128 icon), synthetic patterns
(chessboards, ``color``), multi-page TIFFs and matplotlib's ``s1045.ima.gz``, which is a real MR slice.

``NaturalImageSource(patch)`` turns them into MR-like magnitude references: random image, scale (log-uniform
over ``zoom``), rotation, flip, crop and gamma (sometimes inverted, as contrasts invert between sequences),
a smooth bias field, optionally a random object outline with no signal outside, then the shared acquisition
(Rician noise over the SNR range, background sometimes exactly zero; ``medidiff.data.generators.acquire``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from medidiff.data.generators import (
    AcquisitionConfig,
    SyntheticImage,
    acquire,
    bias_field,
    log_uniform,
    normalise_tissue,
    star_mask,
)
from medidiff.data.shipped import package_file

#: (name, package, path inside the package). Grayscale conversion happens on load.
NATURAL_FILES: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage", "data/astronaut.png"),
    ("brick", "skimage", "data/brick.png"),
    ("camera", "skimage", "data/camera.png"),
    ("cell", "skimage", "data/cell.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("clock", "skimage", "data/clock_motion.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("coins", "skimage", "data/coins.png"),
    ("grass", "skimage", "data/grass.png"),
    ("gravel", "skimage", "data/gravel.png"),
    ("horse", "skimage", "data/horse.png"),
    ("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg"),
    ("immunohistochemistry", "skimage", "data/ihc.png"),
    ("logo", "skimage", "data/logo.png"),
    ("moon", "skimage", "data/moon.png"),
    ("motorcycle_left", "skimage", "data/motorcycle_left.png"),
    ("motorcycle_right", "skimage", "data/motorcycle_right.png"),
    ("page", "skimage", "data/page.png"),
    ("shepp_logan_phantom", "skimage", "data/phantom.png"),
    ("retina", "skimage", "data/retina.jpg"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("text", "skimage", "data/text.png"),
    ("china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("jacksboro_fault_dem", "matplotlib", "mpl-data/sample_data/jacksboro_fault_dem.npz"),
)
#: Reserved for the out-of-domain evaluation panel: never returned by the training split.
OOD_NAMES: frozenset[str] = frozenset({"shepp_logan_phantom", "camera", "coins", "gravel", "flower"})
SPLITS = ("train", "ood")


def _load_gray(package: str, relative: str) -> np.ndarray:
    """One shipped image as float32 grayscale scaled so its 99th percentile is 1."""
    path = package_file(package, relative)
    if path.suffix == ".npz":
        with np.load(path) as z:
            arr = np.asarray(z["elevation"], np.float32)
        arr = arr - float(arr.min())
    else:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "P"):  # composite transparency onto black
                im = im.convert("RGBA")
                rgba = np.asarray(im, np.float32) / 255.0
                arr = (rgba[..., :3] @ np.float32([0.2125, 0.7154, 0.0721])) * rgba[..., 3]
            else:
                arr = np.asarray(im.convert("L"), np.float32) / 255.0
    p99 = float(np.percentile(arr, 99))
    if not np.isfinite(p99) or p99 <= 0:
        raise ValueError(f"{path}: image has no signal")
    out = np.ascontiguousarray(arr / p99, dtype=np.float32)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=2)
def natural_images(split: str = "train") -> tuple[tuple[str, np.ndarray], ...]:
    """``(name, image)`` of one split: grayscale float32 (read-only), 99th percentile 1.

    Cached per process.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    keep = [(n, p, r) for n, p, r in NATURAL_FILES if (n in OOD_NAMES) == (split == "ood")]
    return tuple((name, _load_gray(package, rel)) for name, package, rel in keep)


@dataclass(frozen=True)
class NaturalConfig:
    """Ranges of the natural-image source."""

    zoom: tuple[float, float] = (0.25, 1.5)  # output pixels per image pixel
    gamma: tuple[float, float] = (0.6, 1.6)
    invert_p: float = 0.25
    object_p: float = 0.5  # chance of a random object outline with no signal outside
    bias: float = 0.3
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)


def _sample_patch(
    image: np.ndarray, size: tuple[int, int], rng: np.random.Generator, zoom_range: tuple[float, float]
) -> tuple[np.ndarray, float]:
    """A randomly rotated, flipped and scaled crop of ``image`` (antialiased when shrinking)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = image.shape
    diag = float(np.hypot(*size))
    zoom = log_uniform(rng, *zoom_range)
    zoom = max(zoom, diag / (min(h, w) - 8))  # the rotated patch must fit inside the image
    angle = rng.uniform(0, 2 * np.pi)
    half = 0.5 * diag / zoom + 2
    cy, cx = rng.uniform(half, h - half), rng.uniform(half, w - half)
    y0, y1 = int(cy - half), int(np.ceil(cy + half))
    x0, x1 = int(cx - half), int(np.ceil(cx + half))
    region = image[y0:y1, x0:x1]
    if zoom < 1.0:
        region = gaussian_filter(region, 0.5 * np.sqrt(1.0 / zoom**2 - 1.0), mode="reflect")
    yy = (np.arange(size[0], dtype=np.float32) - (size[0] - 1) / 2)[:, None]
    xx = (np.arange(size[1], dtype=np.float32) - (size[1] - 1) / 2)[None, :]
    c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
    flip = -1.0 if rng.random() < 0.5 else 1.0
    src_y = cy - y0 + c * yy - s * xx * flip
    src_x = cx - x0 + s * yy + c * xx * flip
    patch = map_coordinates(region, [src_y, src_x], order=1, mode="reflect", output=np.float32)
    return patch, zoom


class NaturalImageSource:
    """MR-like magnitude references made from one split of the shipped natural images."""

    def __init__(self, split: str = "train", cfg: NaturalConfig | None = None) -> None:
        self.images = natural_images(split)
        self.split = split
        self.cfg = cfg or NaturalConfig()

    @property
    def names(self) -> list[str]:
        """Names of the images this source draws from."""
        return [n for n, _ in self.images]

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int] = 128) -> SyntheticImage:
        """One reference image of ``size`` (float32 magnitude; tissue 99th percentile about 1)."""
        from scipy.ndimage import gaussian_filter

        cfg = self.cfg
        shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        index = int(rng.integers(len(self.images)))
        name, image = self.images[index]
        patch, zoom = _sample_patch(image, shape, rng, cfg.zoom)
        patch = np.clip(patch, 0.0, None) / max(float(patch.max()), 1e-6)
        inverted = bool(rng.random() < cfg.invert_p)
        if inverted:
            patch = 1.0 - patch
        gamma = log_uniform(rng, *cfg.gamma)
        patch = (patch**gamma).astype(np.float32) * bias_field(rng, shape, cfg.bias)
        body = np.ones(shape, bool)
        if rng.random() < cfg.object_p:
            jitter = rng.uniform(-0.15, 0.15, 2) * np.asarray(shape)
            centre = (shape[0] / 2 + jitter[0], shape[1] / 2 + jitter[1])
            radius = rng.uniform(0.25, 0.5) * min(shape)
            body = star_mask(shape, centre, radius, rng, harmonics=3, roughness=rng.uniform(0.0, 0.3),
                             aspect=log_uniform(rng, 1.0, 1.5))  # fmt: skip
            patch = patch * gaussian_filter(body.astype(np.float32), 0.7)  # partial volume at the outline
        clean = normalise_tissue(patch, body)
        noisy, acq = acquire(clean, body, rng, cfg.acquisition)
        params = {"image": name, "zoom": zoom, "gamma": gamma, "inverted": inverted, **acq}
        return SyntheticImage(noisy, clean, body, params)

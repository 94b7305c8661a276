"""The confound set: the paper's cat-ear / cat-tail story, with ground truth.

Every image carries two features, each a class-specific glyph: **A** in the top-left
region and **B** (the complement of the same class code: lit where A is dark)
in the bottom-right region, over a noisy background. Glyphs come from Hadamard codes, so
all classes are equally far apart in both features. Variants:

- ``both``: A and B both show the label's glyph (they always co-occur, like ears and tails);
- ``only_a``: B shows a random class's glyph, so only A predicts the label;
- ``only_b``: A shows a random class's glyph, so only B predicts the label.

A model trained on ``only_a`` can use only A; one trained on ``only_b`` only B. On
``both`` test images the two agree on every label, and natural CKA calls them similar;
inverting through the only-A model changes A only (B stays the seed's), so CKA on
inverted data shows that they rely on different features.

Within-class variability (position ``jitter``, glyph ``contrast`` range and background
``noise``) matters a great deal. Measured with MLPs trained 4 epochs (``tests`` and
``benchmarks``): with jitter 1 only ~73% of the representation variance is between
classes and natural CKA(only-A, only-B) is ~0.56; with jitter 0 it is 99% and ~0.93.
The defaults (jitter 0, noise 0.05, contrast 0.8-1.0) keep it small. MLPs are the clean
setting for this experiment: their first layer is symmetric in distribution to pixel
permutations, so an only-A and an only-B network differ only in the feature they use.

Examples:
    >>> from invsim.data.confound import make_confound
    >>> ds = make_confound("only_a", n=50, split="test")
    >>> len(ds), ds[0][0].shape, float(ds.images.min()) >= 0
    (50, torch.Size([1, 28, 28]), True)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from invsim.data.base import TensorImageDataset, check_split

__all__ = ["VARIANTS", "glyphs", "make_confound"]

VARIANTS = ("both", "only_a", "only_b")
GLYPH_SEED = 20220801  # fixed: every split and data seed shares the same class glyphs


def glyphs(num_classes: int, size: int, *, salt: int) -> np.ndarray:
    """Class glyphs (num_classes, size, size) in {0, 1}, all pairs equally far apart.

    Each glyph is a row of a Sylvester-Hadamard matrix laid out as a 4x4 (or larger)
    block pattern, with positions shuffled by ``salt``: every pair of classes differs in
    exactly half the blocks, so no two classes are more alike than any other two. The same
    holds for feature A and feature B, so both induce the same (symmetric) class geometry,
    as ears and tails both follow the same semantic classes in real images.
    """
    cells = 4
    while cells * cells < num_classes + 1:
        cells *= 2
    h = np.array([[1.0]])
    while h.shape[0] < cells * cells:
        h = np.block([[h, h], [h, -h]])
    rng = np.random.default_rng(GLYPH_SEED + salt)
    codes = (h[1 : num_classes + 1] > 0).astype(np.float32)  # skip the constant row
    codes = codes[:, rng.permutation(cells * cells)]
    block = -(-size // cells)
    grid = codes.reshape(num_classes, cells, cells)
    big = np.kron(grid, np.ones((block, block), dtype=np.float32))
    return np.ascontiguousarray(big[:, :size, :size])


_PARAMETERS = (
    "variant",
    "n",
    "split",
    "image_size",
    "channels",
    "num_classes",
    "glyph_size",
    "jitter",
    "noise",
    "contrast",
    "agree",
    "rng_seed",
)


@dataclass(frozen=True)
class _Scene:
    """How an image is drawn: its size, the glyphs' jitter and contrast range, the noise."""

    image_size: int
    jitter: int
    noise: float
    contrast: tuple[float, float]


def _render(
    rng: np.random.Generator,
    feature_a: tuple[np.ndarray, np.ndarray],
    feature_b: tuple[np.ndarray, np.ndarray],
    scene: _Scene,
) -> np.ndarray:
    """Noisy background, glyph A top-left and glyph B bottom-right, each at its contrast;
    ``feature_a`` is (each image's class, the glyph bank), likewise ``feature_b``."""
    (cls_a, glyph_a), (cls_b, glyph_b) = feature_a, feature_b
    image_size, jitter, noise, contrast = (
        scene.image_size,
        scene.jitter,
        scene.noise,
        scene.contrast,
    )
    n, glyph_size, margin = len(cls_a), glyph_a.shape[-1], 1 + jitter
    images = rng.normal(0.0, noise, size=(n, image_size, image_size)).astype(np.float32) + 0.1
    far = image_size - glyph_size - margin
    for i in range(n):
        for cls, bank, (r0, c0) in (
            (cls_a[i], glyph_a, (margin, margin)),
            (cls_b[i], glyph_b, (far, far)),
        ):
            dr, dc = rng.integers(-jitter, jitter + 1, size=2)
            r, c = r0 + dr, c0 + dc
            level = rng.uniform(*contrast)
            patch = images[i, r : r + glyph_size, c : c + glyph_size]
            images[i, r : r + glyph_size, c : c + glyph_size] = np.maximum(patch, level * bank[cls])
    return images


def _check_confound(variant, split, image_size, glyph_size, jitter, num_classes) -> None:
    """Errors that name the setting: the variant, the split, room for two glyphs."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown confound variant {variant!r}; use one of {VARIANTS}.")
    check_split(split)
    margin = 1 + jitter
    if 2 * (glyph_size + 2 * margin) > image_size + 2:
        raise ValueError(
            f"image_size {image_size} is too small for two glyphs of size {glyph_size} with "
            f"jitter {jitter}; use image_size >= {2 * (glyph_size + 2 * margin) - 2}."
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")


def make_confound(
    variant: str = "both",
    *,
    n: int | None = None,
    split: str = "train",
    image_size: int = 28,
    channels: int = 1,
    num_classes: int = 10,
    glyph_size: int = 8,
    jitter: int = 0,
    noise: float = 0.05,
    contrast: tuple[float, float] = (0.8, 1.0),
    agree: float | None = None,
    rng_seed: int = 0,
) -> TensorImageDataset:
    """Generate the confound set in memory (fast, seedable).

    ``agree`` is the probability that the feature that does *not* define the label shows
    the label's glyph anyway (default: 1 for ``both``, chance otherwise). ``split``
    picks an independent sample ("train": ``n`` defaults to 4,000; "test": 1,000).
    """
    _check_confound(variant, split, image_size, glyph_size, jitter, num_classes)
    n = n if n is not None else (4000 if split != "test" else 1000)
    split_salt = {"train": 0, "test": 1, "all": 2}[split]
    rng = np.random.default_rng([rng_seed, split_salt])
    glyph_a = glyphs(num_classes, glyph_size, salt=0)
    glyph_b = 1.0 - glyph_a  # the complement: a distinct pattern with the same class geometry

    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    if agree is None:
        agree = 1.0 if variant == "both" else 1.0 / num_classes
    # the other feature shows the label with probability `agree`, else one of the other
    # classes uniformly (so agree = 1/num_classes is a uniformly random class)
    shift = rng.integers(1, num_classes, n)
    other = np.where(rng.random(n) < agree, labels, (labels + shift) % num_classes)
    cls_a = labels if variant != "only_b" else other
    cls_b = labels if variant != "only_a" else other

    scene = _Scene(image_size, jitter, noise, tuple(contrast))
    images = _render(rng, (cls_a, glyph_a), (cls_b, glyph_b), scene)
    x = torch.from_numpy(np.clip(images, 0.0, 1.0))[:, None].repeat(1, channels, 1, 1)
    params = {k: v for k, v in locals().items() if k in _PARAMETERS}  # n, agree resolved
    params["contrast"] = list(contrast)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    ds = TensorImageDataset(
        x,
        torch.from_numpy(labels.astype(np.int64)),
        classes=[f"class{i}" for i in range(num_classes)],
        id=f"confound:{variant}:{split}:{digest}",
    )
    ds.feature_a = torch.from_numpy(cls_a.astype(np.int64))  # type: ignore[attr-defined]
    ds.feature_b = torch.from_numpy(cls_b.astype(np.int64))  # type: ignore[attr-defined]
    return ds

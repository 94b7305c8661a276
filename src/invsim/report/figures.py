"""Figures: paired heatmaps, similarity against robustness, seed/target/inverted grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from invsim.similarity import SimilarityMatrix  # noqa: E402

__all__ = [
    "confound_examples",
    "depth_plot",
    "heatmaps",
    "image_grid",
    "layer_heatmaps",
    "measure_panel",
    "robustness_plot",
]

TITLES = {
    "natural": "natural images (symmetric)",
    "inverted": "inverted images (row model's data)",
    "stir": "STIR(column | row)",
}


def _annotate(ax, m: SimilarityMatrix, lo: float) -> None:
    """Each cell's value, and under it half the width of its interval when there is one."""
    for i in range(len(m.rows)):
        for j in range(len(m.cols)):
            v = m.values[i, j]
            half = None
            if "ci_low" in m.stats:
                half = (m.stats["ci_high"][i, j] - m.stats["ci_low"][i, j]) / 2
            ax.text(
                j,
                i,
                f"{v:.2f}" if half is None else f"{v:.2f}\n±{half:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < lo + 0.6 * (1 - lo) else "black",
            )


def _flag_rows(ax, m: SimilarityMatrix, flagged: Sequence[int]) -> None:
    """Hatch the ``flagged`` rows (inversions that did not converge) and mark their labels."""
    for i in flagged:
        ax.add_patch(
            plt.Rectangle(
                (-0.5, i - 0.5), len(m.cols), 1, fill=False, ec="orange", lw=2, hatch="//"
            )
        )
    if not flagged:
        return
    labels = [("! " + r + " (not converged)") if i in flagged else r for i, r in enumerate(m.rows)]
    ax.set_yticks(range(len(m.rows)), labels, fontsize=8)
    for i in flagged:
        ax.get_yticklabels()[i].set_color("darkorange")


def heatmaps(
    matrices: Mapping[str, SimilarityMatrix],
    path: Path,
    *,
    title: str = "",
    label: str = "linear CKA",
    marks: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    flagged_rows: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Side-by-side heatmaps with one shared colour scale, annotated values, model names;
    ``marks[key]`` cells get a red frame (e.g. entries that have not settled);
    ``flagged_rows[key]`` rows are hatched and their labels marked (e.g. rows whose
    inversions did not converge)."""
    keys = list(matrices)
    lo = min(0.0, *(float(m.values.min()) for m in matrices.values()))
    size = max(len(m.cols) for m in matrices.values())
    fig, axes = plt.subplots(
        1,
        len(keys),
        figsize=(1.0 + 0.7 * size * len(keys) + 1.2, 0.7 * size + 2.0),
        squeeze=False,
        constrained_layout=True,
    )
    im = None
    for ax, key in zip(axes[0], keys, strict=True):
        m = matrices[key]
        im = ax.imshow(m.values, vmin=lo, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(m.cols)), m.cols, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.rows)), m.rows, fontsize=8)
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("column model", fontsize=8)
        ax.set_ylabel("row model", fontsize=8)
        _annotate(ax, m, lo)
        _flag_rows(ax, m, (flagged_rows or {}).get(key, []))
        for i, j in (marks or {}).get(key, []):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measure_panel(
    panels: Mapping[str, Mapping[str, SimilarityMatrix]],
    path: Path,
    *,
    ranges=None,
    flagged: Sequence[str] = (),
) -> Path:
    """Small multiples: one row per measure, natural and inverted side by side, each row
    on its own colour scale (the measure's declared range). Rows of the inverted
    matrices named in ``flagged`` (inversions that did not converge) are hatched."""
    regimes = [r for r in ("natural", "inverted", "stir") if r in panels]
    measures = list(panels[regimes[0]])
    size = max(len(panels[regimes[0]][m].cols) for m in measures)
    fig, axes = plt.subplots(
        len(measures),
        len(regimes),
        squeeze=False,
        constrained_layout=True,
        figsize=(0.45 * size * len(regimes) + 2.5, 0.45 * size * len(measures) + 1.0),
    )
    for row, name in zip(axes, measures, strict=True):
        lo, hi = (ranges or {}).get(name, (None, None))
        im = None
        for ax, regime in zip(row, regimes, strict=True):
            m = panels[regime][name]
            im = ax.imshow(m.values, vmin=lo, vmax=hi, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks(range(len(m.rows)), m.rows if regime == regimes[0] else [], fontsize=6)
            ax.set_title(f"{name}: {regime}", fontsize=8)
            for r in flagged if regime == "inverted" else ():
                i = m.rows.index(r)
                ax.add_patch(
                    plt.Rectangle(
                        (-0.5, i - 0.5), len(m.cols), 1, fill=False, ec="orange", lw=1.5, hatch="//"
                    )
                )
        fig.colorbar(im, ax=row.tolist(), shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def robustness_plot(robustness: Mapping[str, Any], path: Path) -> Path:
    """Mean similarity to all other models against training eps, one line per
    architecture, one panel per measure."""
    keys = list(robustness)
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False, constrained_layout=True
    )
    for ax, key in zip(axes[0], keys, strict=True):
        per = robustness[key]["per_model"]
        for arch in sorted({v["arch"] for v in per.values()}):
            pts = sorted(
                (v["eps"], v["mean_similarity"]) for v in per.values() if v["arch"] == arch
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
        rho = robustness[key]["spearman"]
        ax.set_title(f"{key}: Spearman {rho:.2f}" if rho is not None else key, fontsize=10)
        ax.set_xlabel("training eps (L2)")
        ax.set_ylabel("mean CKA to other models")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matched_plot(
    matched: Mapping[str, Any],
    eps: Mapping[str, float],
    path: Path,
    arch: Mapping[str, str] | None = None,
) -> Path:
    """Each row model's similarity to the other architectures against the loss level of
    its inversion path (the end point last), one line per model, coloured by its eps, one
    marker per architecture."""
    levels = sorted(matched["levels"], key=float, reverse=True)
    xs = [*range(len(levels)), len(levels)]
    labels = [*levels, "end point"]
    rows = list(matched["end_point"]["similarity"])
    values = [eps.get(r, 0.0) for r in rows]
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    cmap = plt.get_cmap("viridis")
    kinds = sorted({(arch or {}).get(r, r) for r in rows})
    markers = dict(zip(kinds, "osD^v<>ph*", strict=False))
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    for r in rows:
        ys = [matched["levels"][lv]["similarity"].get(r, np.nan) for lv in levels]
        ys.append(matched["end_point"]["similarity"][r])
        shade = (eps.get(r, 0.0) - lo) / (hi - lo) if hi > lo else 0.0
        marker = markers.get((arch or {}).get(r, r), "o")
        ax.plot(xs, ys, marker=marker, color=cmap(shade), label=f"{r} (eps {eps.get(r, 0):g})")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("inversion loss level (first iterate at or below it)")
    ax.set_ylabel(f"mean {matched['measure']} to other architectures")
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    path: Path,
    *,
    title: str = "",
    captions: Sequence[str] | None = None,
) -> Path:
    """A grid: one row per (label, images (k, C, H, W)) pair, k columns."""
    k = len(rows[0][1])
    fig, axes = plt.subplots(
        len(rows), k, figsize=(1.1 * k + 0.8, 1.2 * len(rows) + 0.5), squeeze=False
    )
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            img = images[c].detach().float().cpu().numpy()
            ax.imshow(
                img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)),
                cmap="gray" if img.shape[0] == 1 else None,
                vmin=0,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and captions is not None:
                ax.set_title(captions[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confound_examples(path: Path, *, per_variant: int = 6, rng_seed: int = 0) -> Path:
    """A few examples of each confound variant (for the README and the report)."""
    from invsim.data.confound import make_confound

    rows = []
    for variant in ("both", "only_a", "only_b"):
        ds = make_confound(variant, n=per_variant, split="test", rng_seed=rng_seed)
        rows.append((variant, ds.images))
    return image_grid(rows, path, title="confound set: A top-left, B bottom-right")


def layer_heatmaps(
    blocks: Sequence[tuple[str, SimilarityMatrix]],
    path: Path,
    *,
    label: str = "linear CKA",
    columns: int = 3,
) -> Path:
    """Layer-by-layer heatmaps, one per (title, matrix): rows the first model's layers
    (shallow at the top), columns the second's, one colour scale; the dashed line is the
    diagonal of "same relative depth"."""
    lo = min(0.0, *(float(np.nanmin(m.values)) for _, m in blocks))
    cols = min(columns, len(blocks))
    rows = -(-len(blocks) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 1, 4.0 * rows), squeeze=False, constrained_layout=True
    )
    im = None
    for ax, (title, m) in zip(axes.flat, blocks, strict=False):
        im = ax.imshow(m.values, vmin=lo, vmax=1.0, cmap="magma", aspect="auto")
        short = [c.removeprefix("model.") for c in m.cols]
        ax.set_xticks(range(len(m.cols)), short, rotation=70, ha="right", fontsize=6)
        ax.set_yticks(range(len(m.rows)), [r.removeprefix("model.") for r in m.rows], fontsize=6)
        ax.plot([-0.5, len(m.cols) - 0.5], [-0.5, len(m.rows) - 0.5], "--", color="cyan", lw=1)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(blocks) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label=label)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def depth_plot(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, label: str = "linear CKA"
) -> Path:
    """Similarity by relative depth: one line per curve (natural, each row's inverted)."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for name, pts in curves.items():
        pts = sorted(p for p in pts if p[1] is not None)
        style = "-o" if name == "natural" else "--s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=name)
    ax.set_xlabel("relative depth of the row model's layer (0: input side, 1: output side)")
    ax.set_ylabel(f"mean {label} with other models\nat the same relative depth")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The report: figures and one self-contained HTML file (images embedded).

``write_report(out_dir)`` rebuilds everything from ``results.json`` and the stored
inverted data sets, so ``invsim report DIR`` works on any finished run.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from invsim.report.figures import (
    confound_examples,
    heatmaps,
    image_grid,
    matched_plot,
    measure_panel,
    robustness_plot,
)
from invsim.results import CONFOUND_COLUMNS, Results, confound_table
from invsim.similarity import SimilarityMatrix
from invsim.store.diagnostics import CONVERGED_LOSS, converged

__all__ = ["write_outputs", "write_report"]

EXPLAIN = {
    "heatmaps": (
        "Linear CKA between every pair of models, on one colour scale. Left: natural held-out "
        "images, the same for every pair, so the matrix is symmetric. Right: row r, column c is "
        "CKA between model r and model c on <em>model r's inverted data set</em> (images that "
        "keep only the features model r uses); it is asymmetric. Natural CKA over-states "
        "similarity when features co-occur in images; lower values on the right mean the "
        "models rely on different features. Under each value, where there is one: half the "
        "width of its 95% interval (the method and what it is for are below); results.json "
        "and the CSVs also hold each cell's interval, the estimate it centres on, and its "
        "permutation null (the value for unrelated representations at this n and these "
        "widths) and p-value."
    ),
    "robustness": (
        "Each model's mean CKA to all other models, against the adversarial training eps, one "
        "line per architecture. Jones et al. find that similarity across architectures rises "
        "with robustness on inverted data; the Spearman correlation is in each title."
    ),
    "measures": (
        "The paper's question under each measure: is similarity on inverted data far lower "
        "than on natural images, and does it rise with robustness? One row of small "
        "multiples per measure, natural and inverted side by side, each on the measure's "
        "own range."
    ),
    "grids": (
        "For each model: seeds (top), targets (middle) and the inverted images (bottom): the "
        "seed moved by gradient descent until the model's representation matches the "
        "target's. What changes shows the features the model uses."
    ),
    "confound": (
        "The synthetic confound set: feature A top-left, feature B bottom-right. An only-A "
        "model and an only-B model agree on every natural test image (both features present) "
        "and natural CKA calls them similar; on either model's inverted data their CKA "
        "collapses, while two only-A models stay similar."
    ),
}


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table(rows: list[list[Any]], head: list[str], classes: list[str] | None = None) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    classes = classes or [""] * len(rows)
    body = "".join(
        (f'<tr class="{c}">' if c else "<tr>") + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
        for r, c in zip(rows, classes, strict=True)
    )
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{body}</table>"


def _grids(out: Path, results: Results) -> list[Path]:
    """Seed / target / inverted image grids, read from the stored data sets."""
    from invsim.config import ExperimentConfig
    from invsim.data import dataset_images
    from invsim.data.datasets import load_configured
    from invsim.store import InvertedDataset

    rows = results.matrix("inverted").rows if "inverted" in results.matrices else []
    if not rows:
        return []
    eval_ds = load_configured(ExperimentConfig.checked(results.provenance["config"]).data)
    paths = []
    for name in rows:
        inv = InvertedDataset(out / "inverted" / name)
        k = min(8, len(inv))
        seeds = dataset_images(eval_ds, inv.seed_index[:k].tolist())
        targets = dataset_images(eval_ds, inv.target_index[:k].tolist())
        caps = [
            f"{int(s)}→{int(t)} L={float(loss):.2f}"
            for s, t, loss in zip(
                inv.seed_labels[:k], inv.target_labels[:k], inv.loss[:k], strict=True
            )
        ]
        path = out / "figures" / f"grid-{name}.png"
        image_grid(
            [("seed", seeds), ("target", targets), ("inverted", inv.images[:k])],
            path,
            title=f"{name}: seed / target / inverted",
            captions=caps,
        )
        paths.append(path)
    return paths


def _header(results: Results) -> list[str]:
    prov = results.provenance
    cfg = prov["config"]
    parts = [f"<h1>invsim report: {html.escape(cfg.get('name', 'experiment'))}</h1>"]
    layers = [f"{m['name']} {m['layer']}" for m in cfg.get("models", []) if m.get("layer")]
    own = f" (own layers: {html.escape(', '.join(layers))})" if layers else ""
    parts.append(
        f"<p>Data set <code>{html.escape(cfg['data']['dataset'])}</code>, "
        f"{prov['pairs']} seed/target pairs per model, layer "
        f"<code>{html.escape(cfg['inversion'].get('layer', 'penultimate'))}</code>{own}, "
        f"invsim {prov['invsim']}, torch {prov['torch']}, config hash "
        f"<code>{prov['config_hash']}</code>.</p>"
    )
    dev = prov.get("deviations_from_paper") or {}
    if dev:
        items = ", ".join(f"{k} {v['used']} (paper: {v['paper']})" for k, v in dev.items())
        parts.append(
            f'<p class="warn">Differs from the paper\'s settings: {items}. '
            "The loss each model's inversion reached is in the table below.</p>"
        )
    rows = [
        [key, s["offdiag_mean"], s["offdiag_median"], s.get("asymmetry", "")]
        for key, s in results.summary.items()
    ]
    head = ["regime", "off-diagonal mean", "off-diagonal median", "asymmetry"]
    parts.append("<h2>Summary</h2>" + _table(rows, head))
    return parts + _claims(results.statistics or {})


def _claims(stats: dict) -> list[str]:
    """The paper's claims with their intervals and p-values."""
    if not stats:
        return []
    parts: list[str] = []
    if stats:
        label = {
            "robustness_within": "robustness vs similarity to other architectures, within "
            "architectures (mean Spearman; stratified permutation p)",
            "robustness_spearman": "older statistic: inverted similarity vs robustness over all "
            "models, own-architecture twins included (Spearman)",
            "asymmetry": "asymmetry of the inverted matrix",
            "natural_minus_inverted": "natural minus inverted (off-diagonal mean)",
        }
        rows = [
            [
                label.get(k, k),
                measure,
                *(
                    ("" if v.get(f) is None else v[f])
                    for f in ("value", "ci_low", "ci_high", "p_value")
                ),
            ]
            for k in dict.fromkeys(k for by in stats.values() for k in by)
            for measure, by in stats.items()
            if k in by
            for v in (by[k],)
        ]
        parts.append(
            "<h2>The paper's claims, with their uncertainty</h2><p>95% percentile intervals "
            "from resampling architectures, models, model pairs or cells; p-values from "
            "permuting eps within architectures (the paper's claim: a more robust model "
            "of an architecture is closer to the <em>other</em> architectures), over all "
            "models (the older statistic, for comparison), or flipping the signs of paired "
            "differences. Every claim under every measure of the run.</p>"
            + _table(rows, ["claim", "measure", "value", "ci low", "ci high", "p-value"])
        )
    return parts


def values_tables(mats: dict[str, SimilarityMatrix]) -> str:
    """The numbers behind the heatmaps, one table per regime: each cell's value and, where
    computed, its interval, with the full-precision value in ``data-value``."""
    out = []
    for regime, m in mats.items():
        head = "".join(f"<th>{html.escape(c)}</th>" for c in m.cols)
        body = []
        for i, r in enumerate(m.rows):
            cells = []
            for j, c in enumerate(m.cols):
                v, lo, hi = m.values[i, j], m.stat("ci_low", i, j), m.stat("ci_high", i, j)
                ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) else ""
                cells.append(
                    f'<td data-row="{html.escape(r)}" data-col="{html.escape(c)}" '
                    f'data-value="{float(v)!r}">{v:.3f}{ci}</td>'
                )
            body.append(f"<tr><th>{html.escape(r)}</th>{''.join(cells)}</tr>")
        out.append(
            f'<table class="matrix" data-regime="{html.escape(regime)}"><tr><th>row \\ '
            f"column</th>{head}</tr>{''.join(body)}</table>"
        )
    return f"<details><summary>The numbers behind the heatmaps</summary>{''.join(out)}</details>"


def interval_caption(matrices: Mapping[str, SimilarityMatrix]) -> str:
    """What the heatmaps' intervals are, per regime: their method, the population value
    they are for, the estimate they centre on, and why a regime has none."""
    lines = []
    for regime, m in matrices.items():
        about, measure = m.interval, m.measure or ""
        method, reason = about.get("ci_method"), about.get("ci_reason")
        if method:
            centre = about.get("ci_centre") or measure
            why = (
                f" ({html.escape(centre)} is unbiased where {html.escape(measure)} "
                "is not; that bias can exceed the standard error, so the interval need not "
                "contain the value shown)"
                if centre != measure
                else ""
            )
            lines.append(
                f"<li>{html.escape(regime)}: {html.escape(method)}, for "
                f"{html.escape(about.get('ci_target', ''))}, centred on "
                f"{html.escape(centre)}{why}.</li>"
            )
        elif reason:
            lines.append(f"<li>{html.escape(regime)}: no interval: {html.escape(reason)}</li>")
    return f'<ul class="intervals">{"".join(lines)}</ul>' if lines else ""


def _matrices(out: Path, results: Results) -> list[str]:
    mats = {k: results.matrix(k) for k in results.regimes}
    parts = []
    pair = {k: mats[k] for k in ("natural", "inverted") if k in mats}
    label = results.primary or "linear_cka"
    marks, note = {}, ""
    moved = (results.drift or {}).get("moved", [])
    if moved and "inverted" in mats:
        inv = mats["inverted"]
        marks["inverted"] = [(inv.rows.index(m["row"]), inv.cols.index(m["column"])) for m in moved]
        d = results.drift
        note = (
            f'<p class="warn">Not settled: {len(moved)} inverted entries (red frames) moved '
            f"by more than {d['threshold']} between {d['half_iterations']} iterations and the "
            f"full budget (largest change {d['max_change']:.3f}); more iterations or "
            '<code>schedule="converge"</code> would change them.</p>'
        )
    bad = [n for n, d in results.diagnostics.items() if not converged(d)]
    flagged = {"inverted": [mats["inverted"].rows.index(n) for n in bad]} if bad else {}
    if bad:
        note += (
            f'<p class="warn" id="not-converged">Not converged: the inversions of {", ".join(bad)} '
            f"did not converge (median relative loss above {CONVERGED_LOSS}), so their inverted "
            "data are still close to the seeds and their rows (hatched, marked '!') measure "
            "near-natural similarity.</p>"
        )
    if pair:
        p = heatmaps(
            pair,
            out / "figures" / "heatmaps.png",
            label=label.replace("_", " "),
            marks=marks,
            flagged_rows=flagged,
        )
        caption = interval_caption(mats)
        parts.append(
            f"<h2>Similarity matrices</h2><p>{EXPLAIN['heatmaps']}</p>{caption}{note}{_img(p)}"
            + values_tables(pair)
        )
    if "stir" in mats:
        p = heatmaps({"stir": mats["stir"]}, out / "figures" / "stir.png")
        parts.append(
            f"<h2>STIR</h2><p>STIR(column | row): CKA of the column model on natural "
            f"images and on their inversions through the row model.</p>{_img(p)}"
        )
    if results.robustness:
        p = robustness_plot(results.robustness, out / "figures" / "robustness.png")
        parts.append(f"<h2>Similarity and robustness</h2><p>{EXPLAIN['robustness']}</p>{_img(p)}")
    return parts


def _measures(out: Path, results: Results) -> list[str]:
    """Every measure: the small multiples and the table of the paper's question."""
    from invsim.similarity import MEASURES

    if len(results.measures) < 2:
        return []
    panels = results.matrices  # regime -> measure -> matrix
    ranges = {k: MEASURES[k].range for k in results.measures if k in MEASURES}
    bad = [n for n, d in results.diagnostics.items() if not converged(d)]
    p = measure_panel(panels, out / "figures" / "measures.png", ranges=ranges, flagged=bad)
    rows = []
    for name, s in results.panel.items():
        rho = s.get("inverted_robustness_spearman")
        arrow = "higher" if s["higher_is_similar"] else "lower"
        rows.append(
            [
                name,
                s.get("natural_offdiag_mean", ""),
                s.get("inverted_offdiag_mean", ""),
                "" if rho is None else rho,
                f"{arrow} = more similar",
            ]
        )
    head = [
        "measure",
        "natural off-diagonal mean",
        "inverted off-diagonal mean",
        "inverted vs robustness (Spearman)",
        "direction",
    ]
    return [f"<h2>Every measure</h2><p>{EXPLAIN['measures']}</p>" + _table(rows, head) + _img(p)]


def _inversion(out: Path, results: Results) -> list[str]:
    diagnostics = results.diagnostics
    if not diagnostics:
        return []
    rows = [
        [
            n,
            q["median_initial_loss"],
            q["median_loss"],
            q.get("p90_loss", ""),
            q["target_accuracy"],
            q["n"],
            "yes" if q.get("converged", True) else "NO",
        ]
        for n, q in diagnostics.items()
    ]
    head = [
        "model",
        "median seed loss",
        "median final loss",
        "90th percentile loss",
        "classified as target",
        "pairs",
        "converged",
    ]
    grids = _grids(out, results)
    classes = ["" if q.get("converged", True) else "not-converged" for q in diagnostics.values()]
    return [
        "<h2>Inversion quality</h2>" + _table(rows, head, classes),
        f"<h2>Seeds, targets, inverted images</h2><p>{EXPLAIN['grids']}</p>"
        + "".join(_img(g) for g in grids),
    ]


def _confound(out: Path, results: Results) -> list[str]:
    c = results.confound
    if not c:
        return []
    ex = confound_examples(out / "figures" / "confound-examples.png")
    hm = heatmaps(
        {k: SimilarityMatrix.from_dict(c[k]) for k in ("natural", "inverted")},
        out / "figures" / "confound-heatmaps.png",
    )
    h, removes = c["headline"], c.get("removes_confound", {})
    rows = [[label, *cells] for label, cells in confound_table(h)]
    heads = ["", *CONFOUND_COLUMNS]
    said = {True: "removes", False: "does not remove"}
    verdict = (
        f"Inversion {said[bool(removes.get('inversion'))]} the co-occurrence confound; dCKA on "
        f"natural images {said[bool(removes.get('dcka'))]} it (inverted data: only-A's)."
    )
    return [
        f"<h2>The confound experiment</h2><p>{EXPLAIN['confound']} dCKA (Cui et al. 2022) "
        "is the other remedy: it regresses each Gram matrix on the images' own Gram matrix "
        f"before comparing.</p>{_img(ex)}"
        + _table(rows, heads)
        + f'<p class="verdict">{verdict}</p>'
        + _img(hm)
    ]


def _models(results: Results) -> list[str]:
    if not results.models:
        return []
    rows = []
    for n, m in results.models.items():
        tr = m.get("training") or {}
        rows.append([n, m["arch"], m["eps"], tr.get("clean_acc", ""), tr.get("robust_acc", "")])
    head = ["model", "architecture", "eps", "clean acc", "robust acc"]
    return ["<h2>Models</h2>" + _table(rows, head)]


MAX_LAYER_MAPS = 12  # heatmaps per regime in the report (all are in results.json)
DEPTH_BINS = 10


def _binned(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """A depth profile averaged in ``DEPTH_BINS`` bins of relative depth (bin centres)."""
    bins: dict[int, list[float]] = {}
    for p in points:
        if p["mean"] is not None:
            bins.setdefault(min(int(p["depth"] * DEPTH_BINS), DEPTH_BINS - 1), []).append(p["mean"])
    return [((b + 0.5) / DEPTH_BINS, sum(v) / len(v)) for b, v in sorted(bins.items())]


def _layers_caption(nat: Any, label: str) -> str:
    """The layer-by-layer section's heading and what its cells are."""
    ci = nat.about
    intervals = (
        f" Every cell has a {ci['ci']:.0%} interval for {ci['ci_target']} ({ci['ci_method']}, "
        "centred on debiased CKA) and linear CKA's exact permutation-null mean, in "
        "results.json and the layers CSVs."
        if ci.get("ci_method")
        else ""
    )
    return (
        '<h2 id="layers">Layer by layer</h2><p>Each heatmap compares every selected layer of '
        "one model (rows, input side at the top) with every layer of another (columns), "
        f"{label} on the same {nat.n} images, exact full-data values "
        f"({nat.estimator}; {nat.schedule.get('passes', 1)} pass(es) in a "
        f"{nat.schedule.get('budget', 0) / 1e9:g} GB budget). The dashed line is the "
        f'diagonal of "same relative depth".{intervals}</p>'
    )


def _layers(out: Path, results: Results) -> list[str]:
    """The layer-by-layer heatmaps (natural; inverted where computed) and similarity by
    depth, natural against inverted."""
    from invsim.report.figures import depth_plot, layer_heatmaps
    from invsim.results import depth_profile

    if not results.layers:
        return []
    nat = results.layers["natural"]
    measure = nat.measures[0]
    label = measure.replace("_", " ")
    pairs = [(a, b) for i, a in enumerate(nat.models) for b in nat.models[i + 1 :]]
    blocks = [(f"{a} (rows) x {b}", nat.pair(a, b)) for a, b in pairs[:MAX_LAYER_MAPS]]
    parts = [_layers_caption(nat, label)]
    if blocks:
        p = layer_heatmaps(blocks, out / "figures" / "layers-natural.png", label=label)
        parts.append(f'<h3 id="layers-natural">Natural images</h3>{_img(p)}')
    curves = {"natural": _binned(depth_profile(nat, measure))}
    inverted = results.layers.get("inverted") or {}
    inv_blocks = [
        (f"{row}'s inverted set: {row} x {b}", res.pair(row, b))
        for row, res in inverted.items()
        for b in res.models
        if b != row
    ]
    if inv_blocks:
        p = layer_heatmaps(
            inv_blocks[:MAX_LAYER_MAPS], out / "figures" / "layers-inverted.png", label=label
        )
        parts.append(
            '<h3 id="layers-inverted">Inverted images</h3><p>Row model r\'s layers against '
            "every other model's, on r's inverted set (inverted at r's own layer).</p>" + _img(p)
        )
        for row, res in inverted.items():
            curves[f"inverted ({row})"] = [
                (p["depth"], p["mean"]) for p in depth_profile(res, measure)
            ]
    if len(nat.models) > 1:
        p = depth_plot(curves, out / "figures" / "layers-depth.png", label=label)
        parts.append(
            '<h3 id="layers-depth">Similarity by depth</h3><p>At each relative depth of a row '
            "model, its mean similarity with the other models at the same relative depth: "
            "natural images against each row's inverted set. Where the inverted curve lies far "
            "below the natural one, the natural similarity at that depth is the confound.</p>"
            + _img(p)
        )
    return parts


def _matched(out: Path, results: Results) -> list[str]:
    """The robustness claims at matched convergence: each row against the loss level, and
    the statistics at each level beside the end point's."""
    matched = results.extra.get("matched")
    if not matched or not matched.get("levels"):
        return []
    models = results.models or {}
    eps = {m: float(v.get("eps", 0.0)) for m, v in models.items()}
    arch = {m: str(v.get("arch", m)) for m, v in models.items()}
    p = matched_plot(matched, eps, out / "figures" / "matched.png", arch)
    rows = []
    stages = [("end point", matched["end_point"])]
    stages += [(f"loss {k} (n = {v['n']})", v) for k, v in matched["levels"].items()]
    for where, found in stages:
        for claim, s in found["statistics"].items():
            lo, hi = s.get("ci_low"), s.get("ci_high")
            interval = "" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"
            rows.append([where, claim, s["value"], interval, s["p_value"]])
    table = _table(rows, ["at", "claim", "value", "95% interval", "p-value"])
    warn = "".join(
        f'<p class="warn">{html.escape(d["message"])}</p>' for d in matched["disagreements"]
    )
    skipped = matched.get("not_reached") or {}
    note = (
        f"<p>Levels some row did not reach with enough examples: "
        f"{html.escape(json.dumps(skipped))}.</p>"
        if skipped
        else ""
    )
    return [
        "<h2>The claims at matched convergence</h2><p>Each row recomputed on its examples' "
        "first iterates at or below each loss level of the inversion path (the same number "
        "of examples in every row), against its end point: a row that rises as its "
        "inversions get further measured partly how far they got.</p>"
        + warn
        + _img(p)
        + table
        + note
    ]


def _extras(results: Results) -> list[str]:
    """The artefacts of stages added to the run (:func:`invsim.experiment.add_stage`),
    each under its stage's name."""
    parts = []
    for name, value in results.extra.items():
        if name == "matched":  # its own section
            continue
        body = html.escape(json.dumps(value, indent=2, default=str))
        parts.append(
            f'<h3 id="stage-{html.escape(name)}">{html.escape(name)}</h3><pre>{body}</pre>'
        )
    return ["<h2>Further stages</h2>" + "".join(parts)] if parts else []


def write_report(out_dir: str | Path, *, results: Results | None = None) -> Path:
    """Write figures under ``out_dir/figures`` and ``out_dir/report.html``, from
    ``results`` (default: ``out_dir/results.json``) and the stored inverted data sets."""
    out = Path(out_dir)
    typed = Results.read(out) if results is None else results
    (out / "figures").mkdir(parents=True, exist_ok=True)
    parts = _header(typed) + _matrices(out, typed) + _measures(out, typed)
    parts += _inversion(out, typed)
    parts += _matched(out, typed) + _layers(out, typed) + _confound(out, typed)
    parts += _models(typed) + _extras(typed)
    prov = json.dumps(typed.provenance, indent=2, default=float)
    parts.append("<h2>Provenance</h2><pre>" + html.escape(prov) + "</pre>")
    path = out / "report.html"
    path.write_text(TEMPLATE.replace("{{BODY}}", "\n".join(parts)))
    return path


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>invsim report</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;display:block;margin:1em 0;border:1px solid #ddd}
img.broken{border:3px solid red}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}
.warn{background:#fff4d6;padding:.5em;border-left:4px solid #e0a800}
tr.not-converged td{background:#ffe0b3;font-weight:bold}
pre{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em;font-size:12px}
</style></head><body>
{{BODY}}
<script>
// marks images that failed to load (red border) and records the counts on <body>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
    else { imgs[i].className = "broken"; }
  }
  document.body.setAttribute("data-images-total", imgs.length);
  var bad = document.querySelectorAll("tr.not-converged");
  document.body.setAttribute("data-rows-not-converged", bad.length);
  document.body.setAttribute("data-images-loaded", ok);
});
</script>
</body></html>
"""


def write_outputs(out: str | Path, results: Results, *, report: bool = True) -> None:
    """Every output of a run, from its typed results: results.json, one CSV per regime
    (``natural.csv``, ...), ``layers-natural.csv`` and ``layers-inverted-ROW.csv`` and
    (with ``report``) report.html. Under torchrun only rank 0 writes; all ranks wait."""
    from invsim._io import atomic_write
    from invsim.distributed import barrier, is_main
    from invsim.results import write_layers_csv, write_matrix_csv

    out = Path(out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", results.to_json())
        for regime, by_measure in results.matrices.items():
            write_matrix_csv(by_measure, out / f"{regime}.csv")
        if results.layers:
            write_layers_csv(results.layers["natural"], out / "layers-natural.csv")
            for row, res in results.layers.get("inverted", {}).items():
                write_layers_csv(res, out / f"layers-inverted-{row}.csv")
        if report:
            write_report(out, results=results)
    barrier()

"""Regenerate the README's figures and numbers from real runs (never typed by hand).

    python scripts/readme_figures.py [--demo-dir runs/demo] [--quick]

Runs (or resumes) `invsim demo`, copies its heatmaps to docs/, draws the confound
examples, and rewrites the README sections between the markers with the demo's results
and benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replace(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def _settings_line(results: dict, dev: dict) -> str:
    """How this run's inversion differs from the paper's, its size and its time."""
    inv = results["provenance"]["config"]["inversion"]
    if dev:
        how = "Differs from the paper's settings: " + ", ".join(
            f"{k} {v['used']} (paper {v['paper']})" for k, v in dev.items()
        )
    else:
        how = "The paper's settings"
    rule = (inv.get("steps") or {}).get("rule", "momentum")
    if rule != "momentum":
        how += f", with the {rule} step rule capped at {inv['iterations']} passes"
    drift = results.get("drift") or {}
    moved = len(drift.get("moved", []))
    settled = (
        f"; {moved} inverted entries moved by more than {drift['threshold']} "
        f"between {drift['half_iterations']} iterations and the cap"
        if drift
        else ""
    )
    prov = results["provenance"]
    # a resumed run took only the resume's time; say what the whole run takes
    minutes = prov.get("from_scratch_seconds", prov["seconds"]) / 60
    resumed = (
        f" (this run resumed stored work in {prov['seconds'] / 60:.1f})"
        if minutes - prov["seconds"] / 60 >= 0.5
        else ""
    )
    return (
        f"{how}; {prov['pairs']} pairs per model{settled}; {minutes:.1f} minutes on this "
        f"run's machine{resumed}, training and the layer-by-layer view included."
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo-dir", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tables-only", action="store_true", help="Only the benchmark tables.")
    args = p.parse_args()
    if args.tables_only:
        readme = ROOT / "README.md"
        readme.write_text(training_table(readme.read_text()))
        write_tol_table()
        return
    from invsim.demo import run_demo
    from invsim.experiment import headline
    from invsim.report.figures import confound_examples

    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    confound_examples(docs / "confound-examples.png")
    results = run_demo(args.demo_dir, quick=args.quick, quiet=False)
    out = Path(args.demo_dir)
    for name in ("heatmaps.png", "robustness.png", "confound-heatmaps.png", "measures.png"):
        shutil.copy(out / "figures" / name, docs / f"demo-{name}")
    rows = [
        "| model | arch | eps | clean acc | robust acc | median inversion loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        tr = m.get("training") or {}
        q = results["diagnostics"].get(name, {})
        rob = tr.get("robust_acc")
        rows.append(
            f"| {name} | {m['arch']} | {m['eps']:g} | {tr.get('clean_acc', 0):.3f} | "
            f"{'' if rob is None else f'{rob:.3f}'} | {q.get('median_loss', 0):.3f} |"
        )
    panel = [
        "| measure | natural off-diagonal mean | inverted off-diagonal mean | "
        "inverted vs robustness (Spearman) |",
        "|---|---|---|---|",
    ]
    for name, m in results["panel"].items():
        rho = m.get("inverted_robustness_spearman")
        arrow = "" if m["higher_is_similar"] else " (lower = more similar)"
        panel.append(
            f"| {name}{arrow} | {m['natural_offdiag_mean']:.3f} | "
            f"{m['inverted_offdiag_mean']:.3f} | {'' if rho is None else f'{rho:.2f}'} |"
        )
    claims = claims_table(results.get("statistics") or {})
    levels = ", ".join(f"{e:g}" for e in sorted({m["eps"] for m in results["models"].values()}))
    dev = results["provenance"]["deviations_from_paper"]
    body = "\n".join(
        [
            "```text",
            headline(results),
            "```",
            "",
            _settings_line(results, dev),
            "",
            *rows,
            "",
            "The paper's question under every measure of the demo (robustness ladder eps "
            f"{levels} per architecture):",
            "",
            *panel,
            "",
            "With their uncertainty (95% intervals from resampling models, pairs or cells):",
            "",
            *claims,
            "",
            "![demo heatmaps](docs/demo-heatmaps.png)",
            "",
            "![every measure, natural and inverted](docs/demo-measures.png)",
            "",
            "![similarity against robustness](docs/demo-robustness.png)",
            "",
            "![confound heatmaps](docs/demo-confound-heatmaps.png)",
        ]
    )
    readme = ROOT / "README.md"
    readme.write_text(replace(readme.read_text(), "demo-results", body))
    print("README updated")
    ladders = ROOT / "docs" / "guides" / "robustness-and-claims.md"
    ladders.write_text(training_table(ladders.read_text()))
    write_tol_table()


def claims_table(statistics: dict) -> list[str]:
    """The paper's claims (rows) under every measure (columns): value [interval], p."""
    measures = list(statistics)
    claims = list(dict.fromkeys(k for by in statistics.values() for k in by))
    lines = ["| claim | " + " | ".join(measures) + " |", "|---|" + "---|" * len(measures)]
    for claim in claims:
        cells = []
        for m in measures:
            c = statistics[m].get(claim)
            if c is None:
                cells.append("")
                continue
            interval = "" if c["ci_low"] is None else f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
            p_value = "" if c.get("p_value") is None else f", p={c['p_value']:.3f}"
            cells.append(f"{c['value']:.3f}{interval}{p_value}")
        lines.append(f"| {claim.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def training_table(text: str) -> str:
    """The training table of the robustness guide, from benchmarks/results/training.json."""
    training = ROOT / "benchmarks" / "results" / "training.json"
    if training.exists():
        t = json.loads(training.read_text())
        lines = [
            "| architecture | recipe | seconds | clean acc | robust acc (L2 1.5, PGD-20) |",
            "|---|---|---|---|---|",
        ]
        for r in t["results"]:
            width = f", width {r['width']}" if r.get("width") else ""
            recipe = f"{r['epochs']} epochs{width}" + (
                f", L2 eps {r['adversarial']['eps']} ({r['adversarial']['steps']} steps)"
                if r.get("adversarial")
                else ""
            )
            rob = r.get("robust_acc_l2_1.5_pgd20")
            lines.append(
                f"| {r['arch']} | {recipe} | {r['seconds']:.0f} | {r['clean_acc']:.3f} | "
                f"{'' if rob is None else f'{rob:.3f}'} |"
            )
        text = replace(text, "training-table", "\n".join(lines))
    return text


def write_tol_table() -> None:
    """The scaling guide's early-stopping table, from benchmarks/results/inversion.json."""
    path = ROOT / "benchmarks" / "results" / "inversion.json"
    if not path.exists():
        return
    r = json.loads(path.read_text())
    e = r["early_stopping"]
    lines = [
        f"Paper schedule (2,000 iterations): median loss {e['paper_median_loss']:.4f}. "
        "A fixed schedule comes within one point (0.01) of it after "
        f"{e['fixed_iterations_needed']['within_1_point']} iterations and within 1% of it "
        f"only at {e['fixed_iterations_needed']['within_1pct_relative']}.",
        "",
        "| tol | patience | mean iterations | max | median loss | within 0.01 | within 1% |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in e["tol_runs"]:
        lines.append(
            f"| {t['tol']:g} | {t['patience']} | {t['mean_iterations']:.0f} | "
            f"{t['max_iterations']} | {t['median_loss']:.4f} | {t['within_1_point']} | "
            f"{t['within_1pct_relative']} |"
        )
    doc = ROOT / "docs" / "guides" / "scaling-out.md"
    doc.write_text(replace(doc.read_text(), "tol-results", "\n".join(lines)))
    print("docs/guides/scaling-out.md updated")


if __name__ == "__main__":
    main()

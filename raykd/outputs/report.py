"""`raykd report RUN_DIR`: one self-contained HTML page about a run.

Everything is inline (figures as SVG, the sweep's and search's PNGs as data URIs, no scripts or
styles from elsewhere), so the page can be mailed or attached to a ticket. Sections, each where
the run has what it needs: the results table (mean ± std over seeds), accuracy bars with error
bars, per-unit learning curves (validation accuracy and training loss per epoch), loss-weight
schedules (Early Decay Teacher and other epoch-dependent weights), Tang et al.'s per-sample
diagnostics as histograms, the sweep's trials and the architecture search's Pareto table.

The page's one script counts what rendered into `<body data-figures=N data-tables=M>`, which
the browser test reads back; it logs nothing to the console.
"""
from __future__ import annotations

import base64
import html
import io
import re
import time
from pathlib import Path

import pandas as pd

from raykd.files import atomic_write, output_file
from raykd.outputs.results import final_diagnostics, load_history, read_results, summary_figure, summary_table

REPORT_FILE = "report.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
figure svg, figure img { max-width: 100%; height: auto; }
p.note { font-size: 0.85em; color: #555; }
"""
CHECK = """
document.body.dataset.figures = String(Array.from(document.querySelectorAll("figure")).filter(
  f => { const g = f.querySelector("svg, img"); return g && g.getBoundingClientRect().width > 0 &&
         (g.tagName !== "IMG" || g.naturalWidth > 0); }).length);
document.body.dataset.tables = String(document.querySelectorAll("table").length);
"""


def svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (its XML prologue dropped), then closed."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def figure(markup: str, caption: str) -> str:
    return f"<figure>{markup}<figcaption>{html.escape(caption)}</figcaption></figure>"


def png_figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return figure(f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">', caption)


def table_html(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    def cell(v):
        if isinstance(v, float):
            return "<td>-</td>" if pd.isna(v) else f"<td>{floats.format(v)}</td>"
        if isinstance(v, (int,)) and not isinstance(v, bool):
            return f"<td>{v}</td>"
        return f'<td class="text">{html.escape(str(v))}</td>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def results_section(df: pd.DataFrame) -> str:
    shown = summary_table(df, latency=True)
    shown["params"] = shown["params"].astype("Int64").astype(str)
    return ("<h2>Results</h2><p class=note>Mean ± std over seeds. Models are selected on the "
            "validation split; the test split is for reporting only. latency_ms: batch 1, one "
            "CPU thread, PyTorch.</p>" + table_html(shown, "{:.3g}")
            + figure(svg(summary_figure(df)), "Test top-1 per method, mean ± std over seeds"))


def histories(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Each unit's per-epoch metrics, by unit key."""
    found = {path.stem: load_history(path) for path in sorted((run_dir / "metrics").glob("*.jsonl"))}
    return {key: frame for key, frame in found.items() if frame is not None}


def unit_group(key: str) -> tuple[str, str]:
    """('seed0-kd' -> ('kd', 'seed 0')): units of one entry over seeds share a panel."""
    m = re.match(r"seed(\d+)-(.+)$", key)
    return (m.group(2), f"seed {m.group(1)}") if m else (key, key)


def panels(groups: list[str], height: float = 2.3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, height * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    return fig, dict(zip(groups, axes.flat))


def curves_section(hist: dict[str, pd.DataFrame]) -> str:
    by_group: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for key, frame in hist.items():
        group, seed = unit_group(key)
        by_group.setdefault(group, []).append((seed, frame))
    if not by_group:
        return ""
    out = ["<h2>Learning curves</h2>"]
    for what, pick, caption in (
            ("val", lambda f: [c for c in f.columns if c.startswith("val_top1")],
             "Validation top-1 per epoch (a panel per job entry, a line per seed and head)"),
            ("loss", lambda f: ["loss"] if "loss" in f else [],
             "Training loss per epoch (the weighted sum the optimiser saw)")):
        groups = [g for g, fs in by_group.items() if any(pick(f) for _, f in fs)]
        if not groups:
            continue
        fig, axes = panels(groups)
        for group in groups:
            ax = axes[group]
            for seed, frame in by_group[group]:
                for col in pick(frame):
                    name = seed + (col[len("val_top1"):].replace("/", " ") if what == "val" else "")
                    ax.plot(frame["epoch"], frame[col], marker=".", lw=1, label=name)
            ax.set_title(group, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("epoch", fontsize=7)
            if len(ax.lines) <= 6:
                ax.legend(fontsize=6)
        fig.tight_layout()
        out.append(figure(svg(fig), caption))
    return "".join(out)


def weights_section(hist: dict[str, pd.DataFrame]) -> str:
    """Loss weights in force per epoch (w_NAME columns); one seed each, schedules don't vary by
    seed."""
    first: dict[str, pd.DataFrame] = {}
    for key, frame in hist.items():
        group, _ = unit_group(key)
        if any(c.startswith("w_") for c in frame.columns):
            first.setdefault(group, frame)
    if not first:
        return ""
    fig, axes = panels(list(first))
    for group, frame in first.items():
        ax = axes[group]
        for col in [c for c in frame.columns if c.startswith("w_")]:
            ax.step(frame["epoch"], frame[col], where="post", label=col[2:])
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return ("<h2>Loss-weight schedules</h2>"
            + figure(svg(fig), "Each loss term's weight per epoch (Early Decay Teacher decays "
                     "the channel term; constant weights are flat lines)"))


def diagnostics_section(run_dir: Path) -> str:
    pooled = final_diagnostics(run_dir)
    if not pooled:
        return ""
    keys = [(m, c) for m, df in pooled.items() for c in df.columns if c != "epoch"]
    fig, axes = panels([f"{m}: {c}" for m, c in keys])
    for m, c in keys:
        ax = axes[f"{m}: {c}"]
        values = pooled[m][c].dropna()
        lo, hi = values.quantile([0.01, 0.99]) if len(values) else (0, 1)
        ax.hist(values.clip(lo, hi), bins=40, range=(lo, hi) if hi > lo else None,
                color="#4c72b0")
        ax.set_title(f"{m}: {c}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return ("<h2>Tang et al.'s diagnostics</h2>"
            + figure(svg(fig), "Per-sample values at the final epoch on the training split, all "
                     "seeds pooled: reweight is the true-class gradient's scale relative to plain "
                     "CE; teacher_true_conf the teacher's probability of the true class (values beyond "
                     "the 1st and 99th percentiles are drawn at those edges)"))


def sweep_section(run_dir: Path) -> str:
    path = run_dir / "sweep.parquet"
    if not path.is_file():
        return ""
    trials = pd.read_parquet(path).drop(columns=["error"], errors="ignore")
    top = trials.sort_values("last_val_top1", ascending=False).head(15)
    out = ["<h2>Sweep</h2>", f"<p class=note>{len(trials)} trials, best 15 by validation top-1 "
           "(last epoch).</p>", table_html(top, "{:.4g}")]
    if (run_dir / "sweep.png").is_file():
        out.append(png_figure(run_dir / "sweep.png", "Validation top-1 against each searched "
                              "parameter (hollow: stopped early by ASHA)"))
    return "".join(out)


def search_section(run_dir: Path) -> str:
    folder = run_dir / "search"
    path = folder / "pareto.parquet"
    if not path.is_file():
        return ""
    table = pd.read_parquet(path)
    out = ["<h2>Architecture search</h2>", table_html(table.head(15), "{:.4g}")]
    if (folder / "pareto.png").is_file():
        out.append(png_figure(folder / "pareto.png", "Scored solutions: validation top-1 "
                              "against cost, Pareto front marked"))
    return "".join(out)


def build_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    df = read_results(run_dir)
    hist = histories(run_dir)
    seeds = ", ".join(str(s) for s in sorted(df["seed"].dropna().unique()))
    dataset = ", ".join(sorted(df["dataset"].dropna().astype(str).unique()))
    title = f"raykd report: {run_dir.name}"
    sections = [results_section(df), curves_section(hist), weights_section(hist),
                diagnostics_section(run_dir), sweep_section(run_dir), search_section(run_dir)]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=note>{html.escape(str(run_dir.resolve()))}: "
        f"{len(df)} models, dataset {html.escape(dataset)}, seeds {seeds}; written "
        f"{time.strftime('%Y-%m-%d %H:%M')} by <code>raykd report</code>.</p>"
        + "".join(sections) + f"<script>{CHECK}</script></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    path = output_file(out) if out else Path(run_dir) / REPORT_FILE   # checked before the work
    page = build_report(run_dir)
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    path.chmod(0o644)     # a page to share (atomic_write's private temp file is 0600)
    return path

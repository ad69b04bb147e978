"""The results table: RUN_DIR/results.parquet, one row per trained model.

Rows are written as each run finishes (write aside, then rename), so a crash loses nothing that
was done. Accuracies are fractions in [0, 1]; summaries give mean ± std over seeds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from raykd.errors import RaykdError, one_line
from raykd.files import atomic_write, remove_stale_temps
from raykd.log import log

RESULTS_FILE = "results.parquet"
REQUIRED_COLUMNS = ["method", "role", "model", "dataset", "seed", "val_top1", "test_top1",
                    "params", "wall_s", "epochs"]
def role_order(role: str) -> str:
    """Teachers first, students last, and between them every other role (what unit kinds train
    on the way: heads, neighbourhood parts) by name, whatever kinds are registered."""
    return {"teacher": "0", "student": "2"}.get(role, f"1{role}")


class ResultsTable:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RESULTS_FILE
        remove_stale_temps(self.path)
        self.rows: list[dict] = []
        if self.path.exists():
            try:
                self.rows = read_table(self.path).to_dict("records")
            except RaykdError as e:   # the finished runs' rows are rebuilt from their exports
                aside = self.path.with_name(self.path.name + ".damaged")
                os.replace(self.path, aside)
                log.warning("%s; set aside as %s: the finished runs' rows are written again "
                            "from their checkpoints and exports, nothing is retrained", e, aside)

    def get(self, unit: str) -> dict | None:
        for row in self.rows:
            if row.get("unit") == unit:
                return row
        return None

    def add(self, rows: list[dict]) -> None:
        """Add one run's rows (a run may train several models, e.g. heads), replacing any
        earlier rows of that run."""
        for row in rows:
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"results row lacks columns {missing}")
        units = {row.get("unit") for row in rows}
        self.rows = [r for r in self.rows if r.get("unit") not in units] + list(rows)
        self.write()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def write(self) -> None:
        frame = self.frame()
        atomic_write(self.path, lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False))


def read_results(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise RaykdError(f"no results table at {path} (is {run_dir} a run directory?)")
    return read_table(path)


def read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:    # truncated or not Parquet (pyarrow's ArrowInvalid, OSError, ...)
        raise RaykdError(f"the results table {path} is damaged ({one_line(e, first=True)}); "
                         "re-run the job to rebuild it from its finished runs") from None


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (role, method, model)."""
    keys = ["role", "method", "model"]
    g = df.groupby(keys, sort=False)
    out = g.agg(seeds=("seed", "nunique"), val_mean=("val_top1", "mean"),
                val_std=("val_top1", "std"), test_mean=("test_top1", "mean"),
                test_std=("test_top1", "std"), params=("params", "first"),
                wall_s=("wall_s", "mean")).reset_index()
    out["_order"] = out["role"].map(role_order)
    return out.sort_values(["_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def plus_minus(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.4f} ± {0.0 if pd.isna(std) else std:.4f}"


def summary_table(df: pd.DataFrame, latency: bool = False) -> pd.DataFrame:
    """The results table as shown: accuracies as mean ± std over seeds; with `latency`, the
    median batch-1 latency per row (where the rows carry it)."""
    s = summarize(df)
    table = pd.DataFrame({
        "role": s["role"], "method": s["method"], "model": s["model"], "seeds": s["seeds"],
        "val_top1": [plus_minus(m, d) for m, d in zip(s["val_mean"], s["val_std"])],
        "test_top1": [plus_minus(m, d) for m, d in zip(s["test_mean"], s["test_std"])],
        "params": s["params"]})
    if latency and "latency_ms" in df:
        median = df.groupby(["role", "method", "model"], sort=False)["latency_ms"].median()
        table["latency_ms"] = [median.get(k) for k in zip(s["role"], s["method"], s["model"])]
    table["wall_s"] = s["wall_s"].round(1)
    return table


def format_summary(df: pd.DataFrame) -> str:
    return summary_table(df).to_string(index=False)


def plot_summary(df: pd.DataFrame, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = summary_figure(df)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_figure(df: pd.DataFrame):
    """Test top-1 per (role, method): bars at the mean over seeds, error bars one std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(df)
    labels = [f"{r}\n{m}" for r, m in zip(s["role"], s["method"])]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(s)), 3.5))
    ax.bar(range(len(s)), s["test_mean"], yerr=s["test_std"].fillna(0), capsize=4,
           color="#4c72b0")
    ax.set_xticks(range(len(s)), labels, fontsize=8)
    ax.set_ylabel("test top-1 (mean ± std over seeds)")
    lo = max(0.0, float((s["test_mean"] - s["test_std"].fillna(0)).min()) - 0.05)
    ax.set_ylim(lo, 1.0)
    fig.tight_layout()
    return fig


def load_history(path: str | Path) -> pd.DataFrame | None:
    """A unit's per-epoch metrics (RUN_DIR/metrics/KEY.jsonl); an epoch repeated after a failure
    keeps its last record. None when there is none yet."""
    if not path or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return None
    # parsed line by line (not pd.read_json): times stay epoch seconds, never guessed as dates
    lines = Path(path).read_text().splitlines()
    history = pd.DataFrame([json.loads(line) for line in lines if line.strip()])
    if "epoch" not in history:
        return None
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch")


def final_diagnostics(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Per method, the per-sample diagnostics its units stored at their final epoch, pooled over
    seeds (RUN_DIR/diagnostics/seedN-LABEL/epoch-E.parquet)."""
    root = Path(run_dir) / "diagnostics"
    frames: dict[str, list[pd.DataFrame]] = {}
    for unit_dir in sorted(p for p in root.glob("*") if p.is_dir()):
        files = sorted(unit_dir.glob("epoch-*.parquet"))
        if files:
            method = unit_dir.name.split("-", 1)[1] if "-" in unit_dir.name else unit_dir.name
            frames.setdefault(method, []).append(pd.read_parquet(files[-1]))
    return {method: pd.concat(parts) for method, parts in frames.items()}


def summarize_diagnostics(run_dir: str | Path) -> pd.DataFrame | None:
    """Per method, the distribution (at the final epoch, pooled over seeds) of each per-sample
    diagnostic a method stored: mean and 10/50/90th percentiles."""
    rows = []
    for method, df in final_diagnostics(run_dir).items():
        for col in [c for c in df.columns if c != "epoch"]:
            q = df[col].quantile([0.1, 0.5, 0.9])
            rows.append({"method": method, "diagnostic": col, "samples": len(df),
                         "mean": df[col].mean(), "p10": q[0.1], "p50": q[0.5], "p90": q[0.9]})
    return pd.DataFrame(rows) if rows else None

"""`raykd search`: architecture search over a neighbourhood library, no neighbourhood retrained.

n distilled candidates at each of L positions give n^L stitched students for n*L small
trainings. The search picks one candidate per position minimising an additive proxy (each
part's relative reconstruction error, or the drop of the teacher's val accuracy with only that
part swapped in) under additive budgets (parameters, MACs, batch-1 CPU latency: the teacher's
total minus what is replaced plus what replaces it), exactly, with the integer program of
raykd.nas.selection, for the top K distinct solutions. Their stitched students are scored on the
validation split in parallel Ray tasks, a Pareto table is written, and the best by val accuracy
is exported with a ready-to-run job that fine-tunes it with KD (run here as Ray Train runs when
`--finetune-epochs` > 0).

Outputs in OUT (default LIBRARY/search): pareto.parquet, pareto.png, solutions/rankK.pt (every
scored student), student.pt (the chosen one), student.yaml, and the fine-tuning run's folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from raykd.errors import RaykdError
from raykd.files import atomic_copy, file_hash, torch_save
from raykd.job.factories import is_factory, runtime_env
from raykd.log import log
from raykd.nas.library import NeighbourhoodLibrary
from raykd.nas.selection import best_choices

PROXIES = {"recon": "relative reconstruction error on held-out inputs",
           "swap": "drop of the teacher's val accuracy with only this part swapped in"}
BUDGETS = {"params": ("params", "replaced_params", "teacher_params"),
           "macs": ("macs", "replaced_macs", "teacher_macs"),
           "latency_ms": ("latency_ms", "replaced_latency_ms", "teacher_latency_ms")}


@dataclass
class SearchRequest:
    library: str
    teacher: str                     # the teacher's export path, or its weights hash
    max_params: int | None = None
    max_macs: int | None = None
    max_latency_ms: float | None = None
    top: int = 5
    proxy: str = "recon"
    finetune_epochs: int = 4
    seeds: tuple[int, ...] = (0,)
    out: str | None = None
    bn_recalibration: int = 2048     # training images for each student's BatchNorm statistics
    # parts distilled on "data" or on "gaussian" inputs (their errors are not comparable);
    # None: the kind the library holds, when it holds one
    inputs: str | None = None

    def check(self) -> None:
        for name in ("max_params", "max_macs", "max_latency_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RaykdError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.top < 1:
            raise RaykdError(f"--top must be at least 1, got {self.top}")
        if self.bn_recalibration < 0:
            raise RaykdError(f"--bn-recalibration must be >= 0 (0 turns it off), got "
                             f"{self.bn_recalibration}")
        if self.finetune_epochs < 0:
            raise RaykdError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.inputs not in (None, "data", "gaussian"):
            raise RaykdError(f"--inputs {self.inputs!r}: choose data or gaussian")
        if self.proxy not in PROXIES:
            raise RaykdError(f"--proxy {self.proxy!r}: choose {' or '.join(PROXIES)}")

    @property
    def budgets(self) -> dict[str, float]:
        given = {"params": self.max_params, "macs": self.max_macs,
                 "latency_ms": self.max_latency_ms}
        return {k: v for k, v in given.items() if v is not None}


def library_entries(request: SearchRequest) -> tuple[pd.DataFrame, str]:
    """The library's parts distilled from the requested teacher (one per position and candidate:
    the best by the proxy), each checkpoint verified; and the teacher's export path."""
    library = NeighbourhoodLibrary(request.library)
    if not Path(request.library).is_dir():
        raise RaykdError(f"no neighbourhood library at {request.library}")
    catalog = library.read()
    if not len(catalog):
        raise RaykdError(f"{library.catalog_path} holds no neighbourhoods; build the library with "
                         "`raykd run` on a job with a neighbourhood method (docs/search.md)")
    wanted = file_hash(request.teacher) if Path(request.teacher).is_file() else request.teacher
    mine = catalog[catalog.teacher_hash.str.startswith(wanted)]
    if not len(mine):
        held = ", ".join(f"{h} ({e})" for h, e in catalog.groupby("teacher_hash")
                         .teacher_export.first().items())
        raise RaykdError(f"{library.catalog_path} has no neighbourhoods of teacher {wanted} "
                         f"({request.teacher}); it was built from: {held}")
    for row in mine.itertuples():
        path = Path(row.checkpoint)
        if not path.is_file():
            raise RaykdError(f"{library.catalog_path} names {path}, which is missing")
        if file_hash(path) != row.checkpoint_hash:
            raise RaykdError(f"{path} does not match the hash recorded in "
                             f"{library.catalog_path} (corrupted or replaced)")
    mine = same_inputs(mine, request.inputs)
    mine = mine.assign(cost=proxy_cost(mine, request.proxy))
    # whole rows: per position and candidate the part with the lowest cost, every column its own
    best = (mine.sort_values("cost", kind="stable")
            .drop_duplicates(["nb_start", "nb_stop", "candidate"])
            .sort_values(["nb_start", "cost"], kind="stable"))
    teacher = Path(mine.teacher_export.iloc[0])
    if Path(request.teacher).is_file():
        # absolute: the fine-tuning runs' Ray workers do not start in this folder
        teacher = Path(request.teacher).resolve()
    if not teacher.is_file():
        raise RaykdError(f"the library's teacher export {teacher} is missing; pass --teacher "
                         "with its path")
    return best.reset_index(drop=True), str(teacher)


def same_inputs(rows: pd.DataFrame, inputs: str | None) -> pd.DataFrame:
    """The parts distilled on one kind of inputs: a reconstruction error on synthetic Gaussian
    inputs is not comparable with one on real validation images, so the two never compete."""
    held = sorted(set(rows["inputs"].fillna("data"))) if "inputs" in rows else ["data"]
    if inputs is None:
        if len(held) > 1:
            raise RaykdError(f"the library holds parts distilled on {' and '.join(held)} inputs, "
                             "whose errors are not comparable; choose one with --inputs "
                             f"{'|'.join(held)}")
        inputs = held[0]
    if inputs not in held:
        raise RaykdError(f"the library has no parts distilled on {inputs} inputs for this "
                         f"teacher; it has {', '.join(held)}")
    if "inputs" not in rows:       # a library from before parts recorded their inputs
        return rows
    return rows[rows["inputs"].fillna("data") == inputs]


def proxy_cost(rows: pd.DataFrame, proxy: str) -> pd.Series:
    if proxy == "recon":
        return rows.recon_val.astype(float)
    if rows.val_top1.isna().any():
        raise RaykdError("--proxy swap needs parts distilled on data (inputs: gaussian parts "
                         "have no swapped accuracy); use --proxy recon")
    return rows.teacher_val_top1.astype(float) - rows.val_top1.astype(float)


def positions(entries: pd.DataFrame) -> list[pd.DataFrame]:
    groups = [g.reset_index(drop=True) for _, g in entries.groupby(["nb_start", "nb_stop"])]
    ranges = [(int(g.nb_start[0]), int(g.nb_stop[0])) for g in groups]
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        if c < b:
            raise RaykdError(f"the library holds overlapping positions (blocks {a}-{b} and "
                             f"{c}-{d}) for this teacher; search one grouping at a time")
    return groups


def solve(groups: list[pd.DataFrame], request: SearchRequest) -> list[list[dict]]:
    """The top-K distinct choices under the budgets, best proxy first."""
    budgets, sizes, limits = request.budgets, [], []
    for name, limit in budgets.items():
        own, replaced, total = BUDGETS[name]
        sizes.append([list(g[own] - g[replaced]) for g in groups])
        limits.append(limit - float(groups[0][total][0]))
    costs = [list(g.cost) for g in groups]
    try:
        picks = best_choices(costs, sizes, limits, request.top)
    except RaykdError:
        smallest = {name: float(groups[0][BUDGETS[name][2]][0]) + sum(min(s) for s in size)
                    for name, size in zip(budgets, sizes)}
        raise RaykdError("no stitched student fits the budget (" + ", ".join(
            f"--max-{n.replace('_', '-')} {budgets[n]:g}: the smallest has {smallest[n]:g}"
            for n in budgets) + ")") from None
    return [[g.iloc[i].to_dict() for g, i in zip(groups, choice)] for choice in picks]


def stitch_info(teacher: str, solution: list[dict]) -> dict:
    return {"teacher": teacher,
            "parts": [[int(r["nb_start"]), int(r["nb_stop"]), r["checkpoint"]] for r in solution]}


def score_student(info: dict, data: dict, bn_recalibration: int) -> dict:
    """One stitched student's val accuracy, parameters, MACs and measured latency, its
    BatchNorm statistics first recomputed on `bn_recalibration` training images
    (raykd.models.batchnorm); "export" holds its export payload as scored, with the
    normalisation of the images it was scored on (so a deployed or re-used student sees its
    inputs as it was trained)."""
    from raykd.data import load_dataset
    from raykd.models import count_macs, count_params
    from raykd.models.batchnorm import recalibrate_batchnorm
    from raykd.models.export import build_stitched, model_payload
    from raykd.models.staged import latency_ms
    from raykd.train.batches import evaluate

    spec = data_spec(data)
    splits = load_dataset(spec)
    model = build_stitched(info)
    recalibrate_batchnorm(model, splits.train, spec.eval_batch_size, bn_recalibration)
    model.eval()
    return {"val_top1": evaluate(model, splits.val, spec.eval_batch_size, "cpu"),
            "params": count_params(model), "macs": count_macs(model, splits.input_shape),
            "latency_ms": latency_ms(model, splits.input_shape),
            "export": model_payload(model, splits.num_classes, splits.in_channels,
                                    splits.image_size, spec.mean, spec.std)}


def score_students(infos: list[dict], data: dict, bn_recalibration: int,
                   runtime_env: dict | None = None) -> list[dict]:
    """`score_student` for each stitched student, one Ray task each (no training); the driver
    writes the exports (tasks may run on other nodes)."""
    import ray

    score = ray.remote(num_cpus=1)(score_student)
    if runtime_env:   # the teacher's or the data's factories, for the processes that build them
        score = score.options(runtime_env=runtime_env)
    return ray.get([score.remote(info, data, bn_recalibration) for info in infos])


def data_spec(data: dict):
    from raykd.job.config import job_from_dict

    return job_from_dict({"name": "search", "data": dict(data), "methods": {"ce": {}}}).data


def pareto_front(table: pd.DataFrame) -> pd.Series:
    """True where no other student is at least as good on every axis (fewer or equal params,
    MACs and latency, higher or equal val accuracy) and better on one."""
    axes = table[["params", "macs", "latency_ms"]].to_numpy(float)
    acc = table.val_top1.to_numpy(float)
    out = []
    for i in range(len(table)):
        dominated = any(
            (axes[j] <= axes[i]).all() and acc[j] >= acc[i]
            and ((axes[j] < axes[i]).any() or acc[j] > acc[i])
            for j in range(len(table)) if j != i)
        out.append(not dominated)
    return pd.Series(out, index=table.index)


def plot_pareto(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
    for ax, axis in zip(axes, ("params", "macs", "latency_ms")):
        front = table[table.pareto]
        ax.scatter(table[axis], table.val_top1, facecolors="none", edgecolors="#4c72b0",
                   label="top-K solutions")
        ax.scatter(front[axis], front.val_top1, color="#4c72b0", label="Pareto front")
        chosen = table[table.chosen]
        ax.scatter(chosen[axis], chosen.val_top1, marker="*", s=160, color="#dd8452",
                   label="chosen")
        ax.set_xlabel(axis)
    axes[0].set_ylabel("val_top1 (stitched, before fine-tuning)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_search(request: SearchRequest):
    """Solve, score, write the Pareto table and the chosen student; fine-tune it. Returns
    (pareto table, fine-tuning results or None)."""
    request.check()
    started = time.perf_counter()
    entries, teacher = library_entries(request)
    groups = positions(entries)
    out = Path(request.out or Path(request.library) / "search")
    out.mkdir(parents=True, exist_ok=True)
    log.info("search: %d positions x %s candidates (%d stitched students possible), proxy %s",
             len(groups), "/".join(str(len(g)) for g in groups),
             math.prod(len(g) for g in groups), request.proxy)
    solutions = solve(groups, request)
    log.info("search: %d solutions under %s; scoring them on val in parallel Ray tasks",
             len(solutions), request.budgets or "no budget")
    infos = [stitch_info(teacher, s) for s in solutions]
    data = json.loads(solutions[0][0]["data"])
    scores = score_students(infos, data, request.bn_recalibration,
                            search_runtime_env(teacher, data))
    payloads = [score.pop("export") for score in scores]
    table = pd.DataFrame([{
        "rank": i + 1, "candidates": "+".join(r["candidate"] for r in s),
        "positions": "+".join(str(r["neighbourhood"]) for r in s),
        "proxy": float(sum(r["cost"] for r in s)), **score,
        "estimated_latency_ms": float(s[0]["teacher_latency_ms"]) + sum(
            float(r["latency_ms"]) - float(r["replaced_latency_ms"]) for r in s)}
        for i, (s, score) in enumerate(zip(solutions, scores))])
    table["pareto"] = pareto_front(table)
    best = int(table.val_top1.idxmax())
    table["chosen"] = table.index == best
    search_s = time.perf_counter() - started
    table.attrs["search_s"] = search_s
    table.to_parquet(out / "pareto.parquet", index=False)
    plot_pareto(table, out / "pareto.png")
    exports = [out / "solutions" / f"rank{i + 1}.pt" for i in range(len(infos))]
    for payload, path in zip(payloads, exports):   # ready to train or deploy, as scored
        torch_save(payload, path)
    atomic_copy(exports[best], out / "student.pt")
    job = finetune_job(request, out, teacher, data)
    (out / "student.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    log.info("search: chose %s (val_top1 %.4f, %d params) in %.1f s; wrote %s",
             table.candidates[best], table.val_top1[best], table.params[best], search_s, out)
    results = None
    if request.finetune_epochs:
        from raykd.driver.pipeline import run_job
        from raykd.job.config import job_from_dict

        log.info("search: fine-tuning the chosen student with KD (%d epochs, seeds %s)",
                 request.finetune_epochs, list(request.seeds))
        results = run_job(job_from_dict(job))
    return table, results


def search_factories(teacher: str, data: dict) -> list[str]:
    """The functions of the user's own the search builds with: those the job that trained the
    teacher names (its run folder's job.yaml above the export), allowed here. A teacher export
    outside its run folder that names one is refused where it is loaded, in one line."""
    from raykd.job.config import export_run_factories

    names = export_run_factories(teacher)
    if is_factory(data.get("dataset")) and data["dataset"] not in names:
        raise RaykdError(f"the library's parts were distilled on data {data['dataset']}, which "
                         f"the job above the teacher export {teacher} does not name; search "
                         "from the library of that job's run")
    return names


def search_runtime_env(teacher: str, data: dict) -> dict | None:
    return runtime_env(search_factories(teacher, data))


def finetune_job(request: SearchRequest, out: Path, teacher: str, data: dict) -> dict:
    """A ready-to-run job: the chosen stitched student fine-tuned with KD from its teacher
    (named by its source when that is a factory, so `raykd run` may import it)."""
    defaults = dataclasses.asdict(data_spec({"dataset": data["dataset"]}))
    keep = {k: v for k, v in data.items() if v is not None and
            (k == "dataset" or v != defaults.get(k))}
    return {"name": "finetune", "output_dir": str(out), "seeds": list(request.seeds),
            "data": keep, "teacher": {**teacher_source(teacher), "checkpoint": teacher},
            "student": {"checkpoint": str(out / "student.pt"),
                        "train": {"epochs": max(1, request.finetune_epochs), "lr": 0.05}},
            "methods": {"kd": {"temperature": 4.0, "alpha": 0.9}}}


def teacher_source(teacher: str) -> dict:
    from raykd.models.export import read_export

    arch = read_export(teacher, "model").get("arch")
    return {"model": arch} if is_factory(arch) else {}

"""`raykd export`: one trained student as a deployable file (ONNX or TorchScript).

The student is chosen from a run's results table by label, on the validation split (the seed
with the best val_top1, unless a seed is named). What is written holds the student's own
network only (raykd's exports never carry a method's connectors or transformations), takes
`image` (N, C, H, W float32, as raykd's data loader yields it) and returns `logits` (N, classes).
Before the file is kept it is checked against the PyTorch model on the whole test split, and its
CPU latency is measured at batch 1 and batch 64 on one thread, beside the PyTorch model's.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from raykd.errors import RaykdError
from raykd.files import atomic_write, output_folder
from raykd.log import log
from raykd.models.staged import median_ms

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# float32 logits of the same network through another runtime: summation order differs only
ATOL = 1e-4


def choose_student(df: pd.DataFrame, label: str, seed: int | None = None) -> dict:
    """The student row to export: the given seed, or the best on the validation split."""
    students = df[df["role"] == "student"]
    rows = students[students["method"] == label]
    if rows.empty:
        labels = ", ".join(sorted(students["method"].unique())) or "none"
        raise RaykdError(f"--label {label}: no student with that label in this run; "
                         f"its students: {labels}")
    if seed is not None:
        rows = rows[rows["seed"] == seed]
        if rows.empty:
            raise RaykdError(f"--seed {seed}: {label} has no student of that seed; its seeds: "
                             + ", ".join(str(s) for s in sorted(students[students["method"]
                                                                         == label]["seed"])))
    best = rows.sort_values(["val_top1", "seed"], ascending=[False, True]).iloc[0]
    return best.to_dict()


def load_test_split(run_dir: Path):
    """The run's test split, as (inputs, labels) tensors, from the job it was run with."""
    from raykd.data import load_dataset
    from raykd.job.config import job_from_dict

    job = run_dir / "job.yaml"
    if not job.is_file():
        raise RaykdError(f"{run_dir}: no job.yaml (is it a run directory?)")
    spec = job_from_dict(yaml.safe_load(job.read_text()))
    splits = load_dataset(spec.data)
    loader = torch.utils.data.DataLoader(splits.test, batch_size=512)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys), spec.data.dataset


def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["image"],
                          output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                          verbose=False)


def write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    # traced, not scripted: a staged model is a fixed chain of blocks (no data-dependent flow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch 2.14 marks TorchScript deprecated; it still runs
        torch.jit.trace(model, example).save(str(path))


class Runtime:
    """One way of running the network: call(inputs) -> numpy logits, on one thread."""

    def __init__(self, name: str, call):
        self.name, self.call = name, call


def onnx_runtime(path: Path) -> Runtime:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RaykdError("--format onnx needs onnxruntime: pip install 'raykd[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Runtime("onnxruntime", lambda x: session.run(["logits"], {"image": x.numpy()})[0])


def torchscript_runtime(path: Path) -> Runtime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path)).eval()

    def call(x):
        with torch.no_grad():
            return loaded(x).numpy()
    return Runtime("torchscript", call)


def pytorch_runtime(model: torch.nn.Module) -> Runtime:
    def call(x):
        with torch.no_grad():
            return model(x).numpy()
    return Runtime("pytorch", call)


WRITERS = {"onnx": (write_onnx, onnx_runtime), "torchscript": (write_torchscript,
                                                                torchscript_runtime)}


def batched(runtime: Runtime, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([runtime.call(x[i:i + batch]) for i in range(0, len(x), batch)])


def latency(runtime: Runtime, x: torch.Tensor, batch: int, runs: int = 30) -> float:
    """Median milliseconds of one call on `batch` inputs, after a warm-up (the caller holds torch
    to one thread; onnxruntime sessions are built with one)."""
    inputs = x[:batch] if len(x) >= batch else x[torch.arange(batch) % len(x)]
    return median_ms(lambda: runtime.call(inputs), runs)


def export_student(run_dir: str | Path, label: str, fmt: str = "onnx", seed: int | None = None,
                   out: str | Path | None = None) -> dict:
    """Write the chosen student in `fmt`, check it on the test split, measure its latency; return
    the export's record (also written beside it as JSON)."""
    from raykd.job.config import allow_run_factories
    from raykd.models.export import load_export
    from raykd.outputs.results import read_results

    if fmt not in FORMATS:
        raise RaykdError(f"--format {fmt}: allowed: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    folder = output_folder(out) if out else run_dir / "export"   # checked before the work
    allow_run_factories(run_dir)     # models of the user's own, as the run's job names them
    row = choose_student(read_results(run_dir), label, seed)
    model = load_export(row["export"]).cpu().eval()
    x, y, dataset = load_test_split(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{label}-seed{int(row['seed'])}".replace(":", "_").replace("/", "_")
    path = folder / (name + SUFFIX[fmt])
    write, runtime_for = WRITERS[fmt]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log.info("exporting %s (seed %d, val_top1 %.4f) as %s", label, row["seed"],
                 row["val_top1"], fmt)
        atomic_write(path, lambda tmp: write(model, x[:2], Path(tmp)))
        exported, reference = runtime_for(path), pytorch_runtime(model)
        got, want = batched(exported, x), batched(reference, x)
        max_abs = float(np.abs(got - want).max())
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        if max_abs > ATOL or agree < 1.0:
            path.unlink()
            raise RaykdError(f"{fmt} export of {label} differs from the PyTorch model on the test "
                             f"split: max |logit difference| {max_abs:.2e} (allowed {ATOL:g}), "
                             f"top-1 agreement {agree:.4f}; nothing was kept")
        record = {
            "label": label, "seed": int(row["seed"]), "unit": row["unit"], "format": fmt,
            "file": str(path), "source": row["export"], "model": row["model"],
            "params": int(row["params"]),
            "input": {"name": "image", "shape": ["N", *x.shape[1:]], "dtype": "float32",
                      "preprocessing": f"as raykd's {dataset} loader yields it (normalised)"},
            "output": {"name": "logits", "shape": ["N", int(want.shape[1])]},
            "val_top1": float(row["val_top1"]),
            "test_top1": float((torch.from_numpy(got).argmax(1) == y).float().mean()),
            "test_samples": len(x), "max_abs_diff": max_abs, "top1_agreement": agree,
            "latency_ms": {f"{rt.name}_batch{b}": latency(rt, x, b)
                           for rt in (exported, reference) for b in (1, 64)},
        }
    finally:
        torch.set_num_threads(threads)
    spec_path = path.with_suffix(".json") if fmt == "onnx" else folder / (name + ".torchscript.json")
    atomic_write(spec_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    for written in (path, spec_path):
        written.chmod(0o644)     # files to ship (atomic_write's private temp file is 0600)
    record["spec"] = str(spec_path)
    return record

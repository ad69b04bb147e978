"""The `raykd` command.

    raykd run JOB.yaml [key=value ...]   run a job; prints the results table at the end
    raykd sweep JOB.yaml [key=value ...] Ray Tune search from the job's `sweep:` section
    raykd search LIBRARY --teacher T ... architecture search over distilled neighbourhoods
    raykd submit JOB.yaml --address URL  run a job on a Ray cluster (Jobs SDK), stream its logs
    raykd results RUN_DIR [--plot F.png] print a run's results table (mean ± std over seeds)
    raykd export RUN_DIR --label L       a trained student as ONNX or TorchScript, checked
    raykd report RUN_DIR                 a one-page HTML report of a run
    raykd data export NAME OUT           a built-in dataset as an image folder of PNG files

Bad input ends with a one-line error and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from raykd.errors import RaykdError


def _cmd_run(args) -> int:
    from raykd.cluster.ray_env import init_ray, stop_on_signals
    from raykd.data import load_dataset
    from raykd.driver.ownership import own
    from raykd.driver.pipeline import run_job
    from raykd.driver.plan import preflight
    from raykd.job.config import check_writable, job_runtime_env, load_job
    from raykd.outputs.results import ResultsTable

    spec = load_job(args.job, args.overrides)
    check_writable(spec)
    own(spec.run_dir, wait=args.wait)   # one driver per run folder, before Ray starts
    ResultsTable(spec.run_dir)        # a damaged results table is set aside before Ray starts
    splits = load_dataset(spec.data)  # absent data fails here, before Ray starts
    preflight(spec, splits)
    init_ray(spec.ray.address, spec.ray.num_cpus, runtime_env=job_runtime_env(spec))
    stop_on_signals()   # after ray.init, which installs Ray's own handler
    df = run_job(spec, splits=splits, fail_at=injected_failures(), checked=True)
    print(f"\nresults: {spec.run_dir / 'results.parquet'}")
    print_report(spec.run_dir, df)
    if args.emit_results:
        from raykd.cluster.submit import emit_results
        emit_results(df)
    return 0


def injected_failures() -> dict[str, int] | None:
    """Fault injection for tests of the command itself: RAYKD_FAIL_AT="seed0-kd:1,..." makes
    those runs fail after that epoch's checkpoint (every attempt)."""
    text = os.environ.get("RAYKD_FAIL_AT", "").strip()
    if not text:
        return None
    try:
        return {key: int(epoch) for key, epoch in (item.rsplit(":", 1) for item in text.split(","))}
    except ValueError:
        raise RaykdError(f"RAYKD_FAIL_AT={text!r}: write UNIT:EPOCH[,UNIT:EPOCH]") from None


def _cmd_submit(args) -> int:
    from pathlib import Path

    from raykd.cluster.submit import Cluster, check_factories_travel, job_path_in_project, results_from_logs
    from raykd.files import atomic_write
    from raykd.job.config import load_job

    if args.stop or args.follow:
        if args.job:
            raise RaykdError("give a job file or --follow/--stop JOB_ID, not both")
        cluster = Cluster(args.address, args.token_file)
        if args.stop:
            cluster.call("stop_job", args.stop)
            print(f"asked {cluster.address} to stop {args.stop}")
            return 0
        job_id, local = args.follow, Path(args.results_dir or "runs") / args.follow
    else:
        if not args.job:
            raise RaykdError("give a job file to submit, or --follow JOB_ID / --stop JOB_ID")
        spec = load_job(args.job, args.overrides)   # a bad job fails here, not on the cluster
        project = Path.cwd()
        relative = job_path_in_project(args.job, project)
        check_factories_travel(spec, project)
        cluster = Cluster(args.address, args.token_file)
        job_id = cluster.submit(relative, args.overrides, project)
        local = Path(args.results_dir) / spec.name if args.results_dir else spec.run_dir
        print(f"submitted {job_id} to {cluster.address}", flush=True)
        if args.no_wait:
            print(f"follow: raykd submit --follow {job_id} --address {cluster.address}\n"
                  f"stop:   raykd submit --stop {job_id} --address {cluster.address}")
            return 0
    status, logs = cluster.follow(job_id)
    table = results_from_logs(logs)
    if table is not None:
        path = local / "results.parquet"
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
        print(f"results table of {job_id}: {path}")
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_sweep(args) -> int:
    from raykd.cluster.ray_env import init_ray, stop_on_signals
    from raykd.data import load_dataset
    from raykd.driver.ownership import own
    from raykd.driver.plan import preflight
    from raykd.job.config import check_writable, job_from_dict, job_runtime_env, load_raw
    from raykd.sweep import check_prerequisites, check_sweep, run_sweep

    raw = load_raw(args.job, args.overrides)
    spec = job_from_dict(raw)
    check_sweep(raw, spec)             # every bad key or range fails here, before Ray starts
    check_writable(spec)
    own(spec.run_dir, wait=args.wait)
    splits = load_dataset(spec.data)
    preflight(spec, splits)
    check_prerequisites(raw, spec, splits)
    init_ray(spec.ray.address, spec.ray.num_cpus, runtime_env=job_runtime_env(spec))
    stop_on_signals()   # after ray.init, which installs Ray's own handler
    table, df = run_sweep(raw)
    print(f"\nsweep: {spec.run_dir / 'sweep.parquet'} (best configuration: "
          f"{spec.run_dir / 'best.yaml'})")
    print_sweep(table)
    print(f"\nthe best configuration over seeds {spec.seeds}:")
    print_report(spec.run_dir, df)
    return 0


def _cmd_search(args) -> int:
    import json

    from raykd.cluster.ray_env import init_ray, stop_on_signals
    from raykd.nas.search import (
        SearchRequest,
        library_entries,
        positions,
        run_search,
        search_runtime_env,
        solve,
    )

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise RaykdError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") \
            from None
    request = SearchRequest(args.library, args.teacher, args.max_params, args.max_macs,
                            args.max_latency_ms, args.top, args.proxy, args.finetune_epochs,
                            seeds, args.out, args.bn_recalibration, args.inputs)
    request.check()
    # a bad library or an impossible budget fails here, before Ray starts
    entries, teacher = library_entries(request)
    solve(positions(entries), request)
    data = json.loads(entries.data.iloc[0])
    init_ray(None, None, runtime_env=search_runtime_env(teacher, data))
    stop_on_signals()   # after ray.init, which installs Ray's own handler
    table, results = run_search(request)
    shown = table.drop(columns=["positions"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out = request.out or f"{args.library}/search"
    print(f"\nPareto table: {out}/pareto.parquet (plot: pareto.png); chosen student: "
          f"{out}/student.pt; ready-to-run job: {out}/student.yaml")
    if results is not None:
        print_report(f"{out}/finetune", results)
    return 0


def print_sweep(table, top: int = 10) -> None:
    shown = table.sort_values("last_val_top1", ascending=False).head(top)
    print(shown.drop(columns=["error"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(table) > top:
        print(f"... {len(table) - top} more trials in sweep.parquet")


def print_report(run_dir, df) -> None:
    """The results table (mean ± std over seeds), then any per-sample diagnostics."""
    from raykd.outputs.results import format_summary, summarize_diagnostics

    print(format_summary(df))
    diagnostics = summarize_diagnostics(run_dir)
    if diagnostics is not None:
        print("\nper-sample diagnostics at the final epoch (training split, all seeds):")
        print(diagnostics.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _cmd_results(args) -> int:
    from pathlib import Path

    import pandas as pd

    from raykd.outputs.results import plot_summary, read_results

    sweep = Path(args.run_dir) / "sweep.parquet"
    if sweep.is_file():
        print(f"sweep trials ({sweep}):")
        print_sweep(pd.read_parquet(sweep))
        print()
    df = read_results(args.run_dir)
    print_report(args.run_dir, df)
    if args.plot:
        plot_summary(df, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _cmd_export(args) -> int:
    from raykd.outputs.deploy import export_student

    record = export_student(args.run_dir, args.label, args.format, args.seed, args.out)
    lat = record["latency_ms"]
    runtime = "onnxruntime" if record["format"] == "onnx" else "torchscript"
    print(f"exported {record['label']} (seed {record['seed']}, val_top1 {record['val_top1']:.4f}) "
          f"to {record['file']}")
    print(f"  checked on {record['test_samples']} test images: max |logit difference| "
          f"{record['max_abs_diff']:.2e}, top-1 agreement {record['top1_agreement']:.4f}, "
          f"test_top1 {record['test_top1']:.4f}")
    print(f"  CPU latency, one thread: batch 1 {lat[runtime + '_batch1']:.3f} ms "
          f"(PyTorch {lat['pytorch_batch1']:.3f} ms), batch 64 {lat[runtime + '_batch64']:.3f} ms "
          f"(PyTorch {lat['pytorch_batch64']:.3f} ms)")
    print(f"  input spec: {record['spec']}")
    return 0


def _cmd_report(args) -> int:
    from raykd.outputs.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report written to {path}")
    return 0


def job_command(sub, name: str, fn, summary: str, description: str, job_help: str,
                overrides_help: str) -> None:
    """A command that takes a job file and dotted overrides."""
    cmd = sub.add_parser(name, help=summary, description=description)
    cmd.add_argument("job", help=job_help)
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    cmd.add_argument("--wait", action="store_true",
                     help="if another raykd driver is running this job's folder, wait for it to "
                     "end instead of stopping with an error")
    cmd.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raykd", description="Knowledge distillation on Ray.",
        epilog="Run 'raykd COMMAND --help' for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add_job_commands(sub)
    add_search_command(sub)
    add_submit_command(sub)
    add_run_dir_commands(sub)
    add_data_command(sub)
    return p


def add_job_commands(sub) -> None:
    """`run` and `sweep`: a job file and dotted overrides."""
    job_command(sub, "run", _cmd_run, "run a job and print its results table",
                "Run a job spec. Re-running the same job resumes it: finished runs are kept, "
                "interrupted ones continue from their last checkpoint.",
                "job spec (YAML), e.g. jobs/quickstart.yaml",
                "dotted overrides, e.g. student.train.epochs=5 seeds=[0,1]")
    sub.choices["run"].add_argument(
        "--emit-results", action="store_true",
        help="also print the results table (base64 Parquet between marker lines) for "
        "`raykd submit` to save locally")
    job_command(sub, "sweep", _cmd_sweep, "tune a method's parameters with Ray Tune (validation only)",
                "Search the job's `sweep:` section with Ray Tune (ASHA or FIFO; random or "
                "Optuna), on the validation split; write sweep.parquet, sweep.png and best.yaml, "
                "then run the best configuration over the job's seeds. Re-running the same "
                "command resumes the sweep.",
                "job spec (YAML) with a sweep: section, e.g. jobs/sweep_kd.yaml",
                "dotted overrides, e.g. sweep.num_samples=16")



def add_search_command(sub) -> None:
    search = sub.add_parser(
        "search", help="architecture search over a neighbourhood library",
        description="Choose one distilled candidate per teacher position under parameter, MAC "
        "and latency budgets (exact integer program), score the top K stitched students on "
        "the validation split in parallel Ray tasks, write a Pareto table and plot, export the "
        "best with a ready-to-run job, and fine-tune it with KD. No neighbourhood is retrained.")
    search.add_argument("library", help="a neighbourhood library folder (holds catalog.parquet)")
    search.add_argument("--teacher", required=True,
                        help="the teacher's export (or its weights hash from the catalog)")
    search.add_argument("--max-params", type=int, help="parameter budget of the student")
    search.add_argument("--max-macs", type=int, help="multiply-accumulates per image budget")
    search.add_argument("--max-latency-ms", type=float,
                        help="batch-1 CPU latency budget (one thread), milliseconds")
    search.add_argument("--top", type=int, default=5, help="distinct solutions to score (5)")
    search.add_argument("--proxy", default="recon", choices=["recon", "swap"],
                        help="recon: summed reconstruction error; swap: summed drop of the "
                        "teacher's val accuracy with each part swapped in (default recon)")
    search.add_argument("--finetune-epochs", type=int, default=4,
                        help="KD fine-tuning epochs of the chosen student (0: none; default 4)")
    search.add_argument("--seeds", default="0", help="fine-tuning seeds, e.g. 0,1,2 (0)")
    search.add_argument("--out", help="output folder (default LIBRARY/search)")
    search.add_argument("--bn-recalibration", type=int, default=2048, metavar="N",
                        help="training images to recompute each stitched student's BatchNorm "
                             "statistics on before it is scored (2048; 0 keeps the parts' own)")
    search.add_argument("--inputs", choices=("data", "gaussian"), default=None,
                        help="search the parts distilled on real images or on synthetic inputs "
                             "(default: the kind the library holds; required when it holds both)")
    search.set_defaults(fn=_cmd_search)



def add_submit_command(sub) -> None:
    submit = sub.add_parser(
        "submit", help="run a job on a Ray cluster through the Jobs SDK",
        description="Submit a job to a Ray cluster with this folder as working_dir, stream its "
        "logs, and save its results table locally; exit non-zero if it fails or is stopped. "
        "Plain Ray equivalent: ray job submit --address URL --working-dir . -- python -m "
        "raykd run JOB.yaml")
    submit.add_argument("job", nargs="?", help="job spec (YAML) inside this folder")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    submit.add_argument("--address", help="the head's dashboard URL, e.g. http://127.0.0.1:8265 "
                        "(default: RAY_ADDRESS)")
    submit.add_argument("--token-file", help="the cluster's auth token (default: RAY_AUTH_TOKEN, "
                        "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--follow", metavar="JOB_ID", help="stream a submitted job's logs")
    submit.add_argument("--stop", metavar="JOB_ID", help="stop a submitted job")
    submit.add_argument("--results-dir", help="where the results table goes locally (default: "
                        "the job's output_dir, or runs/JOB_ID with --follow)")
    submit.set_defaults(fn=_cmd_submit)



def add_data_command(sub) -> None:
    data = sub.add_parser("data", help="write a built-in dataset as an image folder",
                          description="Datasets as files, for jobs of your own.")
    actions = data.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    export = actions.add_parser(
        "export", help="write mnist5k or digits as PNG files in class folders",
        description="Write a dataset that ships inside a package (mnist5k: 5,000 MNIST digits; "
        "digits: scikit-learn's 1,797 8x8 digits) as OUT/train/<class>/NNNNN.png, the layout "
        "of `dataset: imagefolder` (jobs/imagefolder.yaml reads it). Nothing is downloaded.")
    export.add_argument("name", choices=["mnist5k", "digits"], help="the dataset")
    export.add_argument("out", help="a new (or empty) folder")
    export.add_argument("--limit", type=int, help="write only this many images (all classes)")
    export.set_defaults(fn=_cmd_data_export)


def _cmd_data_export(args) -> int:
    from raykd.data.folder import export_folder

    count = export_folder(args.name, args.out, args.limit)
    print(f"wrote {count} {args.name} images to {args.out}/train/<class>/")
    return 0


def add_run_dir_commands(sub) -> None:
    """`results`, `export` and `report`: read a finished run's folder."""
    res = sub.add_parser("results", help="print a run's results table",
                         description="Print mean ± std over seeds per role, method and model.")
    res.add_argument("run_dir", help="a run directory (OUTPUT_DIR/NAME)")
    res.add_argument("--plot", metavar="FILE.png", help="also draw accuracy per method")
    res.set_defaults(fn=_cmd_results)

    export = sub.add_parser(
        "export", help="write a trained student as ONNX or TorchScript, checked and timed",
        description="Write one student of a run (the seed with the best val_top1, or --seed) as "
        "ONNX or TorchScript: the student's own network only, input `image` (N, C, H, W), output "
        "`logits`. The file is checked against the PyTorch model on the whole test split and its "
        "CPU latency measured (batch 1 and 64, one thread); a JSON input spec is written beside it.")
    export.add_argument("run_dir", help="a run directory (OUTPUT_DIR/NAME)")
    export.add_argument("--label", required=True, help="the student's label (its methods entry), "
                        "e.g. kd")
    export.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                        help="onnx (default) or torchscript")
    export.add_argument("--seed", type=int, help="export this seed's student instead of the best "
                        "on the validation split")
    export.add_argument("--out", help="output folder (default RUN_DIR/export)")
    export.set_defaults(fn=_cmd_export)

    report = sub.add_parser(
        "report", help="write a run's one-page HTML report",
        description="Write one self-contained HTML page (no network needed to view it): the "
        "results table (mean ± std over seeds), accuracy bars, per-unit learning curves, "
        "loss-weight schedules, Tang's diagnostics histograms, and sweep and search plots "
        "where the run has them.")
    report.add_argument("run_dir", help="a run directory (OUTPUT_DIR/NAME)")
    report.add_argument("--out", help="the page's path (default RUN_DIR/report.html)")
    report.set_defaults(fn=_cmd_report)


def main(argv: list[str] | None = None) -> int:
    from raykd.cluster import ray_env
    from raykd.cluster.ray_env import set_ray_env
    from raykd.log import setup_logging

    set_ray_env()  # before anything imports ray: some settings are read at import
    setup_logging()
    args = build_parser().parse_args(argv)
    ray_env.new_command(forced_exit=argv is None)   # not for a caller of main() in its own process
    try:
        return args.fn(args)
    except RaykdError as e:
        # raised in a Ray task or actor, it comes wrapped with the remote traceback: its own line
        cause = getattr(e, "cause", None)
        print(f"raykd: error: {cause if isinstance(cause, RaykdError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # before stop_on_signals, or under it
        if ray_env.FORCED_EXIT:
            ray_env.exit_within(ray_env.EXIT_GRACE_S)   # a no-op if the signal armed it first
        return ray_env.announce_stop()
    except Exception as e:
        if os.environ.get("RAYKD_DEBUG"):
            raise
        from raykd.errors import one_line, out_of_space

        if out_of_space(e):
            where = getattr(e, "filename", None) or "the output folder"
            print(f"raykd: error: no space left on the device holding {where}; free space and "
                  "re-run the same command (finished work is kept)", file=sys.stderr)
            return 2

        print(f"raykd: error: {one_line(e, typed=True)} (set RAYKD_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

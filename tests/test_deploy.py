"""`raykd export`: the chosen student as ONNX (checked with onnxruntime) and TorchScript."""
import json
import subprocess

import numpy as np
import onnxruntime as ort
import torch

from raykd.models.export import load_export
from raykd.outputs.deploy import load_test_split
from raykd.outputs.results import read_results

from conftest import RAYKD


def export(run_dir, *args):
    return subprocess.run([RAYKD, "export", str(run_dir), *args], capture_output=True, text=True,
                          timeout=300)


def test_onnx_export_matches_the_student_on_the_test_split_and_is_timed(tracked_run):
    run_dir = tracked_run.run_dir
    done = export(run_dir, "--label", "kd")
    assert done.returncode == 0, done.stderr
    assert "top-1 agreement 1.0000" in done.stdout and "batch 64" in done.stdout
    rows = read_results(run_dir)
    kd = rows[(rows.method == "kd") & (rows.role == "student")]
    chosen = kd.sort_values(["val_top1", "seed"], ascending=[False, True]).iloc[0]
    spec = json.loads((run_dir / "export" / f"kd-seed{chosen.seed}.json").read_text())
    assert spec["seed"] == chosen.seed, "chosen on the validation split"
    assert spec["input"]["shape"] == ["N", 1, 28, 28] and spec["output"]["shape"] == ["N", 10]
    assert spec["max_abs_diff"] <= 1e-4 and spec["top1_agreement"] == 1.0
    assert all(v > 0 for v in spec["latency_ms"].values()) and len(spec["latency_ms"]) == 4
    # checked again here, independently: onnxruntime against the exported PyTorch student
    x, y, _ = load_test_split(run_dir)
    session = ort.InferenceSession(spec["file"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x[:100].numpy()})[0]
    with torch.no_grad():
        want = load_export(chosen.export).eval()(x[:100]).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert spec["test_top1"] == float((torch.from_numpy(
        np.concatenate([session.run(None, {"image": x[i:i + 256].numpy()})[0]
                        for i in range(0, len(x), 256)])).argmax(1) == y).float().mean())
    assert (rows[rows.role == "student"].latency_ms > 0).all(), "rows carry batch-1 latency"


def test_torchscript_export_of_a_named_seed_and_bad_labels(tracked_run):
    run_dir = tracked_run.run_dir
    done = export(run_dir, "--label", "cd_gkd", "--seed", "1", "--format", "torchscript")
    assert done.returncode == 0, done.stderr
    path = run_dir / "export" / "cd_gkd-seed1.torchscript.pt"
    loaded = torch.jit.load(str(path))
    x, _, _ = load_test_split(run_dir)
    rows = read_results(run_dir)
    source = rows[(rows.method == "cd_gkd") & (rows.seed == 1) & (rows.role == "student")].iloc[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x[:50]), load_export(source.export).eval()(x[:50]), atol=1e-5)
    bad = export(run_dir, "--label", "nope")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "no student with that label" in bad.stderr
    assert "its students: cd_gkd, ce, dih, feed, kd, kd_top5, nd, nd.stitched" in bad.stderr
    bad_seed = export(run_dir, "--label", "kd", "--seed", "7")
    assert bad_seed.returncode == 2 and "its seeds: 0, 1" in bad_seed.stderr


def test_out_paths_that_cannot_be_written_are_one_line_before_any_work(tracked_run, tmp_path,
                                                                        capsys):
    from raykd.cli import main

    run_dir = str(tracked_run.run_dir)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in (
            (["export", run_dir, "--label", "kd", "--out", str(a_file)], "is a file; give a folder"),
            (["export", run_dir, "--label", "kd", "--out", str(a_file / "sub")],
             "cannot create it"),
            (["report", run_dir, "--out", str(tmp_path)], "is a folder; give the file's path"),
            (["report", run_dir, "--out", str(a_file / "page.html")], "is a file; give a folder")):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

"""The neighbourhood library and `raykd search`: exact top-K selection under budgets, a library
shared by two jobs, the search itself (no neighbourhood retrained), and every bad library."""
import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raykd.cli import main
from raykd.data import load_dataset
from raykd.driver.pipeline import run_job
from raykd.errors import RaykdError
from raykd.files import file_hash
from raykd.job.config import job_from_dict, load_job
from raykd.models.export import build_stitched, load_export
from raykd.nas.search import (
    SearchRequest,
    library_entries,
    positions,
    run_search,
    score_student,
    solve,
)
from raykd.nas.selection import best_choices
from raykd.train.batches import evaluate

from conftest import small_job

# ---- the solver ---------------------------------------------------------------------------

def brute_force(costs, sizes, budgets):
    fits = []
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if all(sum(size[g][i] for g, i in enumerate(choice)) <= b + 1e-9
               for size, b in zip(sizes, budgets)):
            fits.append((sum(c[i] for c, i in zip(costs, choice)), list(choice)))
    return sorted(fits)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), groups=st.integers(1, 4), options=st.integers(1, 4),
       budgets=st.integers(1, 2), k=st.integers(1, 4))
def test_top_k_respects_every_budget_and_matches_brute_force(data, groups, options, budgets, k):
    value = st.integers(0, 20)
    costs = [[data.draw(value) for _ in range(options)] for _ in range(groups)]
    sizes = [[[data.draw(value) for _ in range(options)] for _ in range(groups)]
             for _ in range(budgets)]
    limits = [data.draw(st.integers(0, 20 * groups)) for _ in range(budgets)]
    truth = brute_force(costs, sizes, limits)
    if not truth:
        with pytest.raises(RaykdError, match="no combination fits"):
            best_choices(costs, sizes, limits, k)
        return
    found = best_choices(costs, sizes, limits, k)
    assert len(found) == min(k, len(truth)) and len({tuple(f) for f in found}) == len(found)
    for choice in found:   # every solution fits every budget
        for size, limit in zip(sizes, limits):
            assert sum(size[g][i] for g, i in enumerate(choice)) <= limit
    # the i-th solution's cost is the i-th best cost (ties may pick either choice)
    got = [sum(c[i] for c, i in zip(costs, choice)) for choice in found]
    assert got == [cost for cost, _ in truth[:len(found)]]


def library_frame(rows):
    base = {"teacher_hash": "t", "teacher_params": 1000, "teacher_macs": 10_000,
            "teacher_latency_ms": 1.0, "macs": 0, "replaced_macs": 0, "latency_ms": 0.0,
            "replaced_latency_ms": 0.0}
    return [pd.DataFrame([{**base, **r} for r in group]) for group in rows]


def test_the_solver_finds_the_optimum_where_greedy_is_wrong():
    # Greedy (best error per position, then swap the position that saves most params until it
    # fits) takes p1 -> small (saves 90) and pays error 0.9; the optimum shrinks both a little.
    groups = library_frame([
        [{"candidate": "big", "cost": 0.0, "params": 100, "replaced_params": 100},
         {"candidate": "mid", "cost": 0.2, "params": 60, "replaced_params": 100},
         {"candidate": "small", "cost": 0.9, "params": 10, "replaced_params": 100}],
        [{"candidate": "big", "cost": 0.0, "params": 100, "replaced_params": 100},
         {"candidate": "mid", "cost": 0.2, "params": 60, "replaced_params": 100},
         {"candidate": "small", "cost": 0.9, "params": 10, "replaced_params": 100}]])
    request = SearchRequest("lib", "t", max_params=1000 - 80, top=2)
    best, second = solve(groups, request)
    assert [r["candidate"] for r in best] == ["mid", "mid"]           # error 0.4, 920 params
    assert sorted(r["candidate"] for r in second) == ["big", "small"]  # error 0.9
    with pytest.raises(RaykdError, match="no stitched student fits.*smallest has 820"):
        solve(groups, SearchRequest("lib", "t", max_params=800))


# ---- bad libraries ------------------------------------------------------------------------

def fake_library(tmp_path, teacher=b"teacher"):
    lib = tmp_path / "lib"
    (lib / "parts").mkdir(parents=True)
    export = tmp_path / "teacher.pt"
    export.write_bytes(teacher)
    rows = []
    for start, name in ((1, "stage2"), (2, "stage3")):
        for cand in ("w0.25d1", "w0.5d1", "dw1d1"):
            part = lib / "parts" / f"{name}-{cand}.pt"
            part.write_bytes(f"{name}{cand}".encode())
            rows.append({"teacher_hash": file_hash(export), "teacher_export": str(export),
                         "neighbourhood": name, "nb_start": start, "nb_stop": start + 1,
                         "candidate": cand, "recipe": "r", "recon_val": 0.1, "val_top1": 0.5,
                         "teacher_val_top1": 0.9, "params": 10, "replaced_params": 20,
                         "teacher_params": 1000,
                         "checkpoint": str(part), "checkpoint_hash": file_hash(part)})
    pd.DataFrame(rows).to_parquet(lib / "catalog.parquet")
    return lib, export


def test_the_search_picks_whole_rows_and_keeps_data_and_gaussian_parts_apart(tmp_path):
    """Per position and candidate, the row of the best part, every column its own (a Gaussian
    part's row never borrows a data part's accuracy); parts distilled on data and on Gaussian
    inputs never compete, and a library holding both asks which."""
    lib, export = fake_library(tmp_path)
    catalog = pd.read_parquet(lib / "catalog.parquet")
    gaussian = catalog.copy()
    gaussian["inputs"], gaussian["val_top1"] = "gaussian", float("nan")
    gaussian["recon_val"] = 0.01        # far "better", on inputs that are not comparable
    catalog["inputs"] = "data"
    catalog.loc[0, "recon_val"] = float("nan")   # an unscored first row must not leak
    both = pd.concat([gaussian, catalog], ignore_index=True)
    both.to_parquet(lib / "catalog.parquet")
    with pytest.raises(RaykdError, match="holds parts distilled on data and gaussian inputs"):
        library_entries(SearchRequest(str(lib), str(export)))
    entries, _ = library_entries(SearchRequest(str(lib), str(export), inputs="data"))
    assert (entries.inputs == "data").all() and len(entries) == 6
    assert entries.val_top1.notna().all()
    entries, _ = library_entries(SearchRequest(str(lib), str(export), inputs="gaussian"))
    assert (entries.inputs == "gaussian").all() and entries.val_top1.isna().all()
    # whole rows: a row's columns all come from that row
    for row in entries.itertuples():
        assert row.recon_val == 0.01 and row.inputs == "gaussian"


def test_bad_libraries_are_one_line_errors(tmp_path, capsys):
    lib, export = fake_library(tmp_path)
    entries, teacher = library_entries(SearchRequest(str(lib), str(export)))
    assert [len(g) for g in positions(entries)] == [3, 3] and teacher == str(export)

    def error(*args):
        capsys.readouterr()
        assert main(["search", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    other = tmp_path / "other.pt"
    other.write_bytes(b"another teacher")
    assert "has no neighbourhoods of teacher" in error(str(lib), "--teacher", str(other))
    assert "it was built from: " + file_hash(export) in error(str(lib), "--teacher", str(other))
    assert "no neighbourhood library at" in error(str(tmp_path / "nope"), "--teacher", "x")
    assert "--max-params must be positive" in error(str(lib), "--teacher", str(export),
                                                    "--max-params", "0")
    assert "--bn-recalibration must be >= 0" in error(str(lib), "--teacher", str(export),
                                                      "--bn-recalibration", "-5")
    assert "no stitched student fits" in error(str(lib), "--teacher", str(export),
                                               "--max-params", "900")
    part = lib / "parts" / "stage3-dw1d1.pt"
    part.write_bytes(b"tampered")
    assert f"{part} does not match the hash" in error(str(lib), "--teacher", str(export))
    part.unlink()
    assert f"names {part}, which is missing" in error(str(lib), "--teacher", str(export))
    pd.DataFrame(columns=["teacher_hash"]).to_parquet(lib / "catalog.parquet")
    assert "holds no neighbourhoods" in error(str(lib), "--teacher", str(export))
    (lib / "catalog.parquet").write_bytes(b"not parquet")
    assert "not a readable catalog" in error(str(lib), "--teacher", str(export))


# ---- the library and the search, end to end -------------------------------------------------

def nd_job(tmp_path, teacher, name, groups, candidates):
    job = small_job(tmp_path, name=name, methods={"nd": {
        "method": "neighbourhood", "groups": groups, "candidates": candidates,
        "train": {"epochs": 1, "optimizer": "adam", "lr": 0.01}}})
    job["teacher"] = {"model": "cnn", "checkpoint": str(teacher)}
    return job_from_dict(job)


def test_two_jobs_share_a_library_and_search_retrains_nothing(ray_session, tmp_path,
                                                             digits_teacher):
    run_job(nd_job(tmp_path, digits_teacher, "a", ["stage2", "stage3"], ["w0.25d1", "dw1d1"]))
    lib = tmp_path / "neighbourhoods"
    assert len(pd.read_parquet(lib / "catalog.parquet")) == 4
    # a second job: one part the library has (taken, not trained), one it lacks (trained)
    b = run_job(nd_job(tmp_path, digits_teacher, "b", ["stage3"], ["dw1d1", "w0.5d1"]))
    parts = b[b.role == "neighbourhood"].set_index("model")
    assert str(parts.reused_from["dw1d1"]).startswith(str(lib / "parts"))
    assert not (tmp_path / "b" / "metrics" / "seed0-nd-stage3-dw1d1.parquet").exists()
    assert pd.isna(parts.reused_from["w0.5d1"])
    catalog = pd.read_parquet(lib / "catalog.parquet")
    assert len(catalog) == 5 and catalog.groupby("neighbourhood").size().to_dict() == \
        {"stage2": 2, "stage3": 3}
    assert (catalog.macs > 0).all() and (catalog.latency_ms > 0).all()
    assert set(catalog.family) == {"conv", "depthwise"}

    budget = int(catalog.teacher_params[0]) - 1000   # the teacher's size rules out the largest
    out = tmp_path / "search"
    table, results = run_search(SearchRequest(str(lib), str(digits_teacher), max_params=budget,
                                              top=3, finetune_epochs=1, out=str(out)))
    assert 1 <= len(table) <= 3 and (table.params <= budget).all()
    assert table.pareto.any() and table.chosen.sum() == 1
    assert pd.read_parquet(lib / "catalog.parquet").equals(catalog), "nothing retrained"
    # the only Ray Train run of the search is the chosen student's fine-tuning
    runs = [p.name for p in (out / "finetune" / "ray").iterdir() if p.name != "units"]
    assert runs == ["seed0-kd"], "its only Ray Train run is the fine-tuning"
    # each student is exported as scored: its BatchNorm statistics recomputed on training images
    chosen = load_export(out / "student.pt")
    data = load_job(out / "student.yaml").data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # as its scoring task did
    try:
        assert evaluate(chosen, load_dataset(data).val, data.eval_batch_size, "cpu") == \
            table[table.chosen].val_top1.iloc[0]
    finally:
        torch.set_num_threads(threads)
    as_stitched = build_stitched(chosen.stitch_info)
    means = [(a, b) for (k, a), b in zip(chosen.state_dict().items(),
                                         as_stitched.state_dict().values()) if "running_mean" in k]
    assert means and not all(torch.equal(a, b) for a, b in means)
    tuned = results[results.method == "kd"].iloc[0]
    assert tuned.params == table[table.chosen].params.iloc[0]
    assert (out / "pareto.png").stat().st_size > 1000
    # the written job runs as is, and as the same architecture from fresh weights
    spec = load_job(out / "student.yaml", ["student.reinit=true", "name=scratch"])
    assert spec.student.checkpoint == str(out / "student.pt")
    assert json.loads(catalog.data[0])["dataset"] == "digits"


def test_a_scored_student_is_exported_with_the_normalisation_of_its_images(tmp_path,
                                                                          digits_teacher):
    """A searched student is written as scored, ready to deploy or to distil from: its export
    records how its images were normalised (here an image folder with the job's own mean and
    std), as a trained student's does; without it, `raykd export` and a job that takes it as
    `teacher.checkpoint` would feed it images normalised otherwise."""
    from PIL import Image

    for label in range(10):
        (tmp_path / "png" / "train" / str(label)).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(i))
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(
                tmp_path / "png" / "train" / str(label) / f"{i}.png")
    data = {"dataset": "imagefolder", "root": str(tmp_path / "png"), "image_size": 8,
            "val_size": 10, "test_size": 10, "mean": [0.25], "std": [0.125]}
    score = score_student({"teacher": str(digits_teacher), "parts": []}, data, 0)
    assert (score["export"]["mean"], score["export"]["std"]) == ([0.25], [0.125])
    assert 0 <= score["val_top1"] <= 1


def _append_parts(library: str, export_dir: str, teacher: str, rounds: int) -> None:
    """A job's side: the same library entry added again and again, each time with another
    checkpoint (as a part retrained after its entry went stale would be)."""
    from raykd.nas.library import NeighbourhoodLibrary

    lib, folder = NeighbourhoodLibrary(library), Path(export_dir)
    for i in range(rounds):
        export = folder / f"part{i}.pt"
        export.write_bytes(f"weights {i} ".encode() * 50_000)
        lib.add({"teacher_hash": file_hash(teacher), "teacher_export": teacher,
                 "neighbourhood": "stage2", "nb_start": 1, "nb_stop": 2, "candidate": "w0.5d1",
                 "recipe": "r", "recon_val": 0.1, "val_top1": 0.5, "inputs": "data",
                 "params": 10, "replaced_params": 20, "teacher_params": 1000}, str(export))


def test_a_library_searched_while_a_job_adds_to_it_reads_consistent_entries(tmp_path):
    """A search's reader needs no lock: the catalog is replaced atomically and a checkpoint's
    file never changes once written, so every entry it reads has the bytes its hash says while
    another process keeps replacing that entry."""
    import multiprocessing

    from raykd.nas.library import NeighbourhoodLibrary

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher")
    library = tmp_path / "lib"
    _append_parts(str(library), str(tmp_path), str(teacher), 1)
    writer = multiprocessing.get_context("spawn").Process(
        target=_append_parts, args=(str(library), str(tmp_path), str(teacher), 60))
    writer.start()
    reads = 0
    try:
        while writer.is_alive() or reads == 0:
            entries, _ = library_entries(SearchRequest(str(library), str(teacher)))
            assert len(entries) == 1
            reads += 1
    finally:
        writer.join(60)
    assert writer.exitcode == 0 and reads > 5
    assert NeighbourhoodLibrary(library).read().checkpoint_hash.iloc[0] == file_hash(
        tmp_path / "part59.pt")

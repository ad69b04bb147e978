"""Neighbourhood Distillation: stitching, per-unit runs (parallel, retried, data-free), selection."""
import json

import pandas as pd
import pytest
import torch
from torch import nn

from raykd.data import load_dataset
from raykd.driver.pipeline import run_job
from raykd.driver.units import NeighbourhoodPart, Unit
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict
from raykd.job.specs import DataSpec, OptimSpec
from raykd.methods.neighbourhood import choose_candidates
from raykd.models import build_model, count_params
from raykd.models.batchnorm import recalibrate_batchnorm
from raykd.models.export import build_stitched, load_candidate, load_export, save_candidate
from raykd.models.stitch import Candidate, block_shapes, neighbourhoods, pools, stitch
from raykd.teacher import TeacherHandle
from raykd.train.batches import evaluate

from conftest import small_job


def test_stitching_the_teachers_own_blocks_reproduces_it_exactly(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10).eval()
    plan = neighbourhoods(teacher, [])
    assert [n for n, _, _ in plan] == ["stage1", "stage2", "stage3"]
    assert plan[0][1] == 1 and plan[-1][2] == len(teacher.block_names) - 1   # stem, head kept
    own = [(a, b, nn.Sequential(*[teacher.blocks[n] for n in teacher.block_names[a:b]]))
           for _, a, b in plan]
    stitched = stitch(teacher, own).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stitched(x), teacher(x))
        assert stitched.stage_names == teacher.stage_names


def test_candidates_keep_the_neighbourhoods_shapes_and_bad_groups_are_errors():
    teacher = build_model("cnn_wide", 10, 1, 28)
    shapes = block_shapes(teacher, (1, 28, 28))
    for name, a, b in neighbourhoods(teacher, []):
        sizes = {}
        for spec in ("w0.25d1", "w1d2", "w0.5d1", "dw1d1", "dw2d2"):
            cand = Candidate(spec, shapes[a][0], shapes[b - 1][1])
            assert tuple(cand(torch.randn(2, *shapes[a][0])).shape[1:]) == shapes[b - 1][1]
            sizes[spec] = count_params(cand)
        # the families trade differently: depthwise-separable is far smaller at equal width
        assert sizes["dw1d1"] < sizes["w0.5d1"] < sizes["w1d2"]
        assert sizes["w0.25d1"] < sizes["w0.5d1"]
    with pytest.raises(RaykdError, match="unknown neighbourhood 'stage7'"):
        neighbourhoods(teacher, ["stage7"])
    with pytest.raises(RaykdError, match="unknown candidate 'half'"):
        Candidate("half", (1, 8, 8), (1, 8, 8))


def test_candidates_downsample_like_their_neighbourhood_and_pooling_reconstructs_a_pooling_stage(
        tmp_path):
    """cnn stages end in a max-pool, resnet stages stride: a candidate follows its teacher. On a
    conv-BN-ReLU-max-pool stage the pooling candidate's reconstruction error is far below the
    strided one's (same spec, parameters, data and steps): a stride-2 convolution sees one
    position in four and cannot take a max over a window."""
    cnn, resnet = build_model("cnn_wide", 10, 1, 28), build_model("resnet8", 10)
    assert [pools(cnn, a, b) for _, a, b in neighbourhoods(cnn, [])] == [True] * 3
    assert [pools(resnet, a, b) for _, a, b in neighbourhoods(resnet, [])] == [False] * 3
    cnn = build_model("cnn_small", 10, 1, 28).eval()
    shapes = block_shapes(cnn, (1, 28, 28))
    x = torch.randn(512, *shapes[1][0], generator=torch.Generator().manual_seed(0)).relu()
    with torch.no_grad():
        target = cnn.run_blocks(x, 1, 2)
    errors = {}
    for pool in (False, True):
        torch.manual_seed(0)
        cand = Candidate("w0.5d1", shapes[1][0], shapes[1][1], pool=pool)
        assert any(isinstance(m, nn.MaxPool2d) for m in cand.modules()) == pool
        assert tuple(cand(x[:2]).shape[1:]) == shapes[1][1]
        opt = torch.optim.Adam(cand.parameters(), lr=0.005)
        for step in range(200):
            batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
            loss = nn.functional.mse_loss(cand(x[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        cand.eval()
        with torch.no_grad():
            errors[pool] = float(nn.functional.mse_loss(cand(x), target) / target.var())
        save_candidate(cand, tmp_path / f"{pool}.pt")      # the export keeps how it downsamples
        again = load_candidate(tmp_path / f"{pool}.pt").eval()
        assert again.pool == pool and torch.equal(again(x[:4]), cand(x[:4]))
    assert errors[True] < 0.75 * errors[False], errors   # 0.27 against 0.47


def test_selection_under_a_parameter_budget():
    rows = [{"neighbourhood": "s1", "recon_val": 0.1, "params": 50, "replaced_params": 100},
            {"neighbourhood": "s1", "recon_val": 0.3, "params": 10, "replaced_params": 100},
            {"neighbourhood": "s2", "recon_val": 0.2, "params": 80, "replaced_params": 200},
            {"neighbourhood": "s2", "recon_val": 0.5, "params": 20, "replaced_params": 200}]
    chosen, params = choose_candidates(rows, 1000, None)   # no budget: the best of each
    assert (chosen["s1"]["params"], chosen["s2"]["params"], params) == (50, 80, 830)
    # stitched params = 1000 + (candidate - replaced) per neighbourhood
    chosen, params = choose_candidates(rows, 1000, 780)    # (50, 80) = 830 no longer fits
    assert (chosen["s1"]["recon_val"], chosen["s2"]["recon_val"]) == (0.1, 0.5) and params == 770
    chosen, params = choose_candidates(rows, 1000, 760)    # only (10, 20) = 730 fits
    assert (chosen["s1"]["recon_val"], chosen["s2"]["recon_val"]) == (0.3, 0.5) and params == 730
    with pytest.raises(RaykdError, match="no stitched student fits max_params=500"):
        choose_candidates(rows, 1000, 500)


@pytest.fixture
def teacher_path(digits_teacher):
    return digits_teacher


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A `cnn` teacher trained for 3 epochs on digits (a second), and its export."""
    from torch.utils.data import DataLoader

    from raykd.models.export import save_export

    splits = load_dataset(DataSpec(dataset="digits", batch_size=64))
    torch.manual_seed(0)
    trained = build_model("cnn", 10, 1, 8)
    sgd = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for x, y in DataLoader(splits.train, batch_size=64, shuffle=True):
            sgd.zero_grad()
            nn.functional.cross_entropy(trained(x), y).backward()
            sgd.step()
    path = tmp_path_factory.mktemp("trained") / "teacher.pt"
    save_export(trained.eval(), path, 10, 1, 8)
    return trained, path


def test_units_run_in_parallel_fail_once_resume_and_stitch(ray_session, tmp_path, teacher_path):
    job = small_job(tmp_path, name="nd", methods={"nd": {
        "method": "neighbourhood", "groups": ["stage2", "stage3"], "candidates": ["w0.5d1"],
        "finetune_epochs": 1, "train": {"epochs": 3, "optimizer": "adam", "lr": 0.01}}})
    job["teacher"] = {"model": "cnn", "checkpoint": str(teacher_path)}
    job["ray"] = {"max_parallel": 2, "max_failures": 1}
    job["data"]["batch_size"] = 6     # about a second per unit: long enough to overlap (1,097 % 6 > 1)
    spec = job_from_dict(job)
    df = run_job(spec, fail_at={"seed0-nd-stage3-w0.5d1": 1}).set_index("method")
    parts = df[df.role == "neighbourhood"]
    assert sorted(parts.index) == ["nd:stage2:w0.5d1", "nd:stage3:w0.5d1"]
    # both units trained at once: their workers' training spans overlap
    a, b = parts.iloc[0], parts.iloc[1]
    assert a.trained_from < b.trained_until and b.trained_from < a.trained_until
    # the unit that failed after epoch 1 was retried from its checkpoint and finished
    assert parts.loc["nd:stage3:w0.5d1", "resumed_from"] == 1
    assert (parts.epochs == 3).all()
    # its loss fell
    hist = pd.read_parquet(spec.run_dir / "metrics" / "seed0-nd-stage2-w0.5d1.parquet")
    assert hist.loss_mse.iloc[-1] < hist.loss_mse.iloc[0]
    assert hist.recon_val.iloc[-1] < hist.recon_val.iloc[0]
    # the stitched student: evaluated as stitched, then fine-tuned with KD
    assert {"nd.stitched", "nd"} <= set(df.index)
    assert df.loc["nd.stitched", "epochs"] == 0 and df.loc["nd", "epochs"] == 1
    stitched = load_export(df.loc["nd", "export"])
    assert count_params(stitched) == df.loc["nd", "params"]
    assert [n for n in stitched.block_names if n.startswith("nb_")] == ["nb_stage2_block", "nb_stage3_block"]
    # the cnn teacher's stages max-pool, so its parts do too
    assert all(load_candidate(p).pool for p in parts.export)
    # scored as stitched after its BatchNorm statistics were recomputed on training images
    fresh = build_stitched(stitched.stitch_info)
    splits = load_dataset(spec.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as its worker did: the same sums in the same order
    try:
        assert recalibrate_batchnorm(fresh, splits.train, spec.data.eval_batch_size, 2048) == \
            len(splits.train)
        assert evaluate(fresh, splits.val, spec.data.eval_batch_size, "cpu") == \
            df.loc["nd.stitched", "val_top1"]
    finally:
        torch.set_num_threads(threads)


def test_synthetic_inputs_match_the_real_activations(trained_teacher):
    """`inputs: gaussian` draws each boundary's per-channel Gaussians from images matched to the
    teacher's BatchNorm statistics: closer to what real images produce there than Gaussian
    noise images through the teacher (raykd's former route), and never negative after a ReLU."""
    from raykd.train.synthetic import SyntheticBoundary, rectified_gaussian

    model, _ = trained_teacher
    splits = load_dataset(DataSpec(dataset="digits"))
    images = torch.stack([x for x, _ in splits.train])
    for start in range(1, len(model.block_names) - 1):
        with torch.no_grad():
            real = model.run_blocks(images, 0, start).mean(dim=(0, 2, 3))
            noise = model.run_blocks(torch.randn(2048, 1, 8, 8), 0, start).mean(dim=(0, 2, 3))
        boundary = SyntheticBoundary(model, start, (1, 8, 8), seed=0)
        samples = boundary.sample(2048, torch.Generator().manual_seed(1))
        assert boundary.rectified and (samples >= 0).all()
        drawn = samples.mean(dim=(0, 2, 3))
        assert (drawn - real).abs().mean() < 0.6 * (noise - real).abs().mean(), start
    # the rectified normal's moments, checked by sampling
    mu, sigma = rectified_gaussian(torch.tensor([0.5, 0.2]), torch.tensor([0.8, 0.5]))
    z = (mu + sigma * torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(z.clamp_min(0).mean(0), torch.tensor([0.5, 0.2]), atol=0.01)
    assert torch.allclose(z.clamp_min(0).std(0), torch.tensor([0.8, 0.5]), atol=0.01)


def test_gaussian_inputs_are_data_free_end_to_end(ray_session, tmp_path, trained_teacher):
    """A job with `inputs: gaussian` reads no training image at all (its training split fails
    on any read): the parts train on synthetic inputs and the stitched student keeps its parts'
    BatchNorm statistics (bn_recalibration is 0 unless asked) and is only evaluated."""
    _, teacher = trained_teacher
    job = small_job(tmp_path, name="free", data={
        "dataset": "byo_data:digits_without_training_reads", "batch_size": 64},
        teacher={"model": "cnn", "checkpoint": str(teacher)},
        methods={"nd": {"method": "neighbourhood", "inputs": "gaussian",
                        "candidates": ["w0.5d1"],
                        "train": {"epochs": 6, "optimizer": "adam", "lr": 0.01}}})
    df = run_job(job_from_dict(job)).set_index("method")
    parts = df[df.role == "neighbourhood"]
    assert len(parts) == 3 and (parts.epochs == 6).all() and parts.val_top1.isna().all()
    for key in parts.unit:
        hist = pd.read_parquet(tmp_path / "free" / "metrics" / f"{key}.parquet")
        assert hist.recon_val.iloc[-1] < hist.recon_val.iloc[0]
    stitched = df.loc["nd.stitched"]
    assert stitched.val_top1 > 0.5 and stitched.test_top1 > 0.5, "far better than chance (0.1)"


@pytest.mark.parametrize("cached", [True, False], ids=["teacher-cache", "no-cache"])
def test_a_parts_accuracies_from_its_boundary_activations_equal_the_stitched_model(
        tmp_path, cached, trained_teacher):
    """A part scores the teacher with just its neighbourhood swapped from the activations stored
    at the neighbourhood's input (only the candidate and the blocks after it run), and reads the
    teacher's own accuracy from its stored logits: the same numbers as the stitched model and the
    teacher evaluated on the validation and test images, with or without the teacher cache (which
    then holds one entry per split for every boundary of the partition)."""

    from raykd.train.neighbourhood import NeighbourhoodTrainer

    data = DataSpec(dataset="digits", batch_size=64, eval_batch_size=100)
    splits = load_dataset(data)
    _, teacher_path = trained_teacher    # a teacher worth swapping a block of
    unit = Unit(
        key="part", role="neighbourhood", kind="neighbourhood", label="nd:stage2:w0.5d1",
        model="w0.5d1", optim=OptimSpec(epochs=1, optimizer="adam", lr=0.01, weight_decay=0.0),
        data=data, seed=0, export_path=str(tmp_path / "part.pt"),
        history_path=str(tmp_path / "part.jsonl"), teacher_candidates=[str(teacher_path)],
        teachers=[TeacherHandle(str(teacher_path), "local",
                                cache_dir=str(tmp_path / "cache") if cached else None)],
        payload=NeighbourhoodPart("stage2", 2, 3, "w0.5d1", inputs="data",
                                        gaussian_samples=0, input_shape=(1, 8, 8),
                                        boundaries=(1, 2, 3, 4)))
    part = NeighbourhoodTrainer(unit, 0, 1, torch.device("cpu"))
    optimizer = torch.optim.Adam(part.build().parameters(), lr=0.01)
    part.start(0)
    part.train_mode()
    for batch in part.batches(0):
        loss = part.losses(batch, 0)["mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the final metrics, as the skeleton asks for them: costs (MACs, latency) are measured first,
    # and measuring must leave the frozen teacher's BatchNorms in evaluation mode
    metrics = part.evaluate(0, True, 0)
    model = part.teacher.model
    assert not any(m.training for m in model.modules())
    stitched = stitch(model, [(2, 3, part.candidate)])
    for split in ("val", "test"):
        assert metrics[f"{split}_top1"] == evaluate(stitched, getattr(splits, split), 100, "cpu")
        teacher = evaluate(model, getattr(splits, split), 100, "cpu")
        assert metrics[f"{split}_top1"] != teacher, "one epoch's candidate changes some answers"
        if split == "val":
            assert metrics["teacher_val_top1"] == teacher > 0.5
    if cached:   # train, val and test: one entry each, holding every boundary and the logits
        entries = sorted((tmp_path / "cache").glob("*/manifest.json"))
        assert len(entries) == 3
        for manifest in entries:
            assert sorted(json.loads(manifest.read_text())["taps"]) == sorted(
                model.block_names[:4] + ["logits"])


def test_selection_is_exact_where_greedy_fails_and_matches_brute_force():
    import itertools
    import random

    # greedy by error-per-parameter saved picks s1's cheap option and cannot then afford s2's
    # good one; the optimum spends the budget on s2
    rows = [{"neighbourhood": "s1", "recon_val": 0.10, "params": 60, "replaced_params": 100},
            {"neighbourhood": "s1", "recon_val": 0.12, "params": 20, "replaced_params": 100},
            {"neighbourhood": "s2", "recon_val": 0.10, "params": 90, "replaced_params": 100},
            {"neighbourhood": "s2", "recon_val": 0.90, "params": 10, "replaced_params": 100}]
    chosen, params = choose_candidates(rows, 200, 110)
    assert (chosen["s1"]["params"], chosen["s2"]["params"], params) == (20, 90, 110)
    rng = random.Random(0)
    for _ in range(30):   # against brute force on small random libraries
        rows = [{"neighbourhood": f"n{g}", "recon_val": rng.random(), "params": rng.randint(1, 50),
                 "replaced_params": 40} for g in range(4) for _ in range(3)]
        budget = 160 + rng.randint(-60, 40)
        groups = [[r for r in rows if r["neighbourhood"] == f"n{g}"] for g in range(4)]
        fits = [c for c in itertools.product(*groups)
                if 160 + sum(r["params"] - 40 for r in c) <= budget]
        if not fits:
            with pytest.raises(RaykdError, match="no stitched student fits"):
                choose_candidates(rows, 160, budget)
            continue
        best = min(sum(r["recon_val"] for r in c) for c in fits)
        chosen, params = choose_candidates(rows, 160, budget)
        assert params <= budget
        assert sum(r["recon_val"] for r in chosen.values()) == pytest.approx(best)


def test_selection_scales_to_block_level_groups_of_a_deep_teacher():
    teacher = build_model("resnet56", 10)
    plan = neighbourhoods(teacher, [n for n in teacher.block_names[1:-1]])
    assert len(plan) == 27   # 2 candidates each: 1.3e8 combinations to enumerate
    rows = [{"neighbourhood": name, "recon_val": (i % 7) / 10 + w, "params": int(1000 * w),
             "replaced_params": 1000} for i, (name, _, _) in enumerate(plan) for w in (0.25, 0.5)]
    chosen, params = choose_candidates(rows, 27_000, 27_000 - 27 * 600)
    assert len(chosen) == 27
    assert params <= 27_000 - 27 * 600


def test_candidates_and_connectors_end_in_relu_only_where_the_teacher_does():
    from raykd.methods import MethodContext, build_method
    from raykd.models.staged import nonnegative_taps

    wrn = build_model("wrn_16_2", 10).eval()   # pre-activation: stage outputs go negative
    taps = nonnegative_taps(wrn, ["stage2", "stage3"], (3, 32, 32))
    assert taps == {"stage2": False, "stage3": False}
    assert all(nonnegative_taps(build_model("resnet8", 10), ["stage1", "stage3"],
                                (3, 32, 32)).values())
    # a candidate for a pre-activation boundary can fit negative targets; with a ReLU it cannot
    torch.manual_seed(0)
    shapes = block_shapes(wrn, (3, 32, 32))
    free = Candidate("w0.5d1", shapes[2][0], shapes[2][1], relu_out=False)
    clipped = Candidate("w0.5d1", shapes[2][0], shapes[2][1], relu_out=True)
    x = torch.randn(8, *shapes[2][0])
    assert bool((free(x) < 0).any()) and bool((clipped(x) >= 0).all())
    # CD against a WRN teacher: connectors without a final ReLU; against resnet8, with one
    for teacher, relu in ((wrn, False), (build_model("resnet8", 10), True)):
        cd = build_method("cd", {}, MethodContext(student=build_model("resnet8", 10),
                                                  num_classes=10, input_shape=(3, 32, 32),
                                                  teacher=teacher))
        assert all(isinstance(c[-1], nn.ReLU) == relu for c in cd.modules())

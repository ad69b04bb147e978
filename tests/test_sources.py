"""Bring your own model and data: torchvision and timm models (random weights, nothing
downloaded) cut into staged models, and image folders of real PNG files, through a real job."""
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import raykd
from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict
from raykd.models import build_model
from raykd.models.export import load_export, save_export

from conftest import RAYKD, small_job


def _original(name: str, **kw):
    import timm
    import torchvision

    source, arch = name.split(":")
    if source == "timm":
        return timm.create_model(arch, pretrained=False, num_classes=10, **kw)
    return torchvision.models.get_model(arch, weights=None, num_classes=10, **kw)


@pytest.mark.parametrize("name,kw,size,tap,module_path", [
    ("torchvision:resnet18", {}, 64, "layer3.1", "layer3.1"),
    ("torchvision:mobilenet_v3_small", {"width_mult": 0.25}, 64, "features.3", "features.3"),
    ("timm:convnext_atto", {}, 64, "stages.1", "stages.1"),
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32, "blocks.4",
     "blocks.4"),
])
def test_a_sourced_model_is_cut_into_blocks_that_compute_what_it_computes(name, kw, size, tap,
                                                                          module_path):
    torch.manual_seed(0)
    original = _original(name, **kw).eval()
    torch.manual_seed(0)   # the same draws: the same initial weights
    staged = build_model(name, 10, 3, size, kw).eval()
    assert len(staged.blocks) > 3 and staged.arch == name
    x = torch.randn(2, 3, size, size)
    seen = {}
    module = original.get_submodule(module_path)
    hook = module.register_forward_hook(lambda m, i, o: seen.setdefault("tap", o))
    with torch.no_grad():
        want = original(x)
        got = staged.features(x, [tap, "logits"])
    hook.remove()
    assert torch.allclose(got["logits"], want, atol=1e-5)
    assert torch.equal(got[tap], seen["tap"]), "a module path taps that module's output"
    assert staged.stage_names, "stages derived (timm feature_info or feature-map resolutions)"


def test_a_sourced_export_round_trips_with_its_arguments_and_stages(tmp_path):
    model = build_model("torchvision:mobilenet_v3_small", 10, 1, 32, {"width_mult": 0.25},
                        ["features.1", "features.3", "features.8"])
    assert model.stages == {"stage1": "features_1", "stage2": "features_3",
                            "stage3": "features_8"}
    save_export(model, tmp_path / "m.pt", 10, 1, 32)
    back = load_export(tmp_path / "m.pt").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert back.stages == model.stages and back.model_args == {"width_mult": 0.25}


@pytest.mark.parametrize("call,message", [
    (lambda: build_model("keras:res-net50", 10), "unknown model source in 'keras:res-net50'"),
    (lambda: build_model("timm:resnet_18", 10), "unknown timm model 'resnet_18'; close:"),
    (lambda: build_model("torchvision:resnet19", 10), "unknown torchvision classification "
                                                      "model 'resnet19'; close: resnet18"),
    (lambda: build_model("torchvision:resnet18", 10, 3, 32, {"depth": 3}),
     "model torchvision:resnet18 with model_args {'depth': 3}: TypeError"),
    (lambda: build_model("torchvision:resnet18", 10, 3, 32, None, ["layer1.0.conv1"]),
     "cannot cut the model after 'layer1.0.conv1': more than one tensor crosses"),
    (lambda: build_model("torchvision:resnet18", 10, 3, 32, None, ["layer9"]),
     "no module 'layer9' in the model's forward pass; module paths there include conv1"),
    (lambda: build_model("torchvision:resnet18", 10, 3, 32).resolve_tap("layer3.7"),
     "unknown tap 'layer3.7'; allowed: stage1"),
    (lambda: build_model("cnn_small", 10, 1, 28, {"width": 2}),
     "model cnn_small: model_args and stages are for torchvision: and timm: models"),
])
def test_bad_models_are_one_line(call, message):
    with pytest.raises(RaykdError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """600 real MNIST digits as PNG files in class folders, written by the command."""
    out = tmp_path_factory.mktemp("png") / "mnist"
    done = subprocess.run([RAYKD, "data", "export", "mnist5k", str(out), "--limit", "600"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def test_an_image_folder_loads_real_files_and_bad_folders_are_one_line(png_folder, tmp_path):
    from PIL import Image

    spec = job_from_dict(small_job(tmp_path, data={
        "dataset": "imagefolder", "root": str(png_folder), "image_size": 16, "val_size": 50,
        "test_size": 50, "augment": "none"}))
    splits = load_dataset(spec.data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (500, 50, 50)
    assert splits.input_shape == (1, 16, 16) and splits.num_classes == 10 and splits.deterministic
    x, y = splits.train[0]
    assert x.shape == (1, 16, 16) and 0 <= y < 10
    bad = tmp_path / "bad" / "train"
    (bad / "cat").mkdir(parents=True)
    cases = [("empty", "has no class folders")]
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for root, message in cases + [("bad", "class folder")]:
        with pytest.raises(RaykdError, match=message):
            load_dataset(job_from_dict(small_job(tmp_path, data={
                "dataset": "imagefolder", "root": str(tmp_path / root)})).data)
    Image.new("L", (8, 8)).save(bad / "cat" / "a.png")
    (bad / "cat" / "b.png").write_bytes(b"not an image")
    with pytest.raises(RaykdError, match=r"b.png is not a readable image"):
        load_dataset(job_from_dict(small_job(tmp_path, data={
            "dataset": "imagefolder", "root": str(tmp_path / "bad")})).data)


def test_a_timm_teacher_distils_into_a_torchvision_student_on_an_image_folder(
        ray_session, png_folder, tmp_path, monkeypatch):
    """KD, Channel Distillation between stages given by module path, DIH with heads on the timm
    teacher's stages, and Neighbourhood Distillation of the timm teacher cut at those stages,
    whose library `raykd search` then searches: every unit trains and exports, on real PNG
    files resized to a non-square 32x24, through `raykd.run` with a dict."""
    job = small_job(
        tmp_path, name="byo",
        data={"dataset": "imagefolder", "root": str(png_folder), "image_size": [32, 24],
              "batch_size": 50, "val_size": 100, "test_size": 100, "augment": "none"},
        teacher={"model": "timm:resnet10t", "stages": ["layer2", "layer3", "layer4"],
                 "train": {"epochs": 2, "lr": 0.05}},
        student={"model": "torchvision:mobilenet_v3_small", "model_args": {"width_mult": 0.25},
                 "stages": ["features.1", "features.3", "features.8"],
                 "train": {"epochs": 2, "lr": 0.05}},
        methods={"kd": {"temperature": 4, "alpha": 0.9}, "cd": {}, "dih": {},
                 "nd": {"method": "neighbourhood", "candidates": ["w0.25d1"],
                        "train": {"epochs": 1}, "bn_recalibration": 50}},
        heads={"train": {"epochs": 1, "lr": 0.05}})
    df = raykd.run(job)     # from Python, as a notebook would
    assert set(df.role) == {"teacher", "head", "neighbourhood", "student"}
    assert len(df[df.role == "neighbourhood"]) == 3, "one part per stage of the timm teacher"
    students = df[(df.role == "student") & ~df.method.str.startswith("nd")].set_index("method")
    assert set(students.index) == {"kd", "cd", "dih"}
    assert (students.model == "torchvision:mobilenet_v3_small").all()
    stitched = df[df.method == "nd.stitched"].iloc[0]   # no fine-tuning asked
    assert stitched.model.startswith("stitched:") and stitched.params < df[
        df.role == "teacher"].params.iloc[0]
    # the library of the cut timm teacher's parts, searched (the teacher given by a path
    # relative to where the search runs, as on the command line)
    from raykd.nas.search import SearchRequest, run_search

    monkeypatch.chdir(tmp_path)
    teacher = Path(df[df.role == "teacher"].export.iloc[0]).relative_to(tmp_path)
    table, _ = run_search(SearchRequest(str(tmp_path / "neighbourhoods"), str(teacher), top=1,
                                        finetune_epochs=0, out=str(tmp_path / "search")))
    assert table.chosen.sum() == 1 and table.val_top1.between(0, 1).all()
    assert load_export(tmp_path / "search" / "student.pt").stage_names
    ready = yaml.safe_load((tmp_path / "search" / "student.yaml").read_text())
    assert ready["teacher"]["checkpoint"] == str(tmp_path / teacher), "runs from anywhere"
    assert df[df.role == "teacher"].model.iloc[0] == "timm:resnet10t"
    assert df.val_top1.between(0, 1).all() and df.test_top1.between(0, 1).all()
    for export in students.export:   # rebuilt from the export alone: source, arguments, stages
        model = load_export(export)
        assert model.stage_names == ["stage1", "stage2", "stage3"]
    from raykd.outputs.deploy import export_student

    record = export_student(tmp_path / "byo", "kd")   # ONNX, checked against PyTorch on test
    assert record["top1_agreement"] == 1.0 and record["max_abs_diff"] < 1e-3


def test_feed_from_two_teachers_of_different_sources_kd_top_k_and_nd_on_a_torchvision_resnet(
        ray_session, png_folder, tmp_path):
    """FEED from a torchvision and a timm teacher at once, KD with Tang's top-k transform into a
    torchvision student, and Neighbourhood Distillation of the torchvision ResNet-18 teacher cut
    at its stages, on real PNG files: every unit trains, with the sources in its rows."""
    job = small_job(
        tmp_path, name="two_sources",
        data={"dataset": "imagefolder", "root": str(png_folder), "image_size": 16,
              "batch_size": 50, "val_size": 100, "test_size": 100, "augment": "none"},
        teacher={"models": ["torchvision:resnet18", "timm:resnet10t"],
                 "train": {"epochs": 1, "lr": 0.05}},
        student={"model": "torchvision:shufflenet_v2_x0_5", "train": {"epochs": 1, "lr": 0.05}},
        methods={"feed": {"teacher_tap": "layer4", "student_tap": "conv5"},
                 "kd_top3": {"method": "kd", "transform": "topk", "k": 3},
                 "nd": {"method": "neighbourhood", "groups": ["stage3"],
                        "candidates": ["w0.25d1"], "train": {"epochs": 1},
                        "bn_recalibration": 50}})
    df = raykd.run(job)
    teachers = df[df.role == "teacher"]
    assert set(teachers.model) == {"torchvision:resnet18", "timm:resnet10t"}
    students = df[df.role == "student"].set_index("method")
    assert {"feed", "kd_top3", "nd.stitched"} <= set(students.index)
    assert students.loc[["feed", "kd_top3"], "model"].eq("torchvision:shufflenet_v2_x0_5").all()
    assert len(str(students.loc["feed", "teachers"]).split(",")) == 2, "FEED read both teachers"
    part = df[df.role == "neighbourhood"]
    assert len(part) == 1 and part.params.iloc[0] > 0
    assert students.loc["nd.stitched", "params"] < teachers[
        teachers.model == "torchvision:resnet18"].params.iloc[0]
    assert df.val_top1.between(0, 1).all()


def test_starting_weights_load_exactly_and_bad_files_are_one_line(tmp_path):
    import pickle

    import torchvision

    from raykd.models.weights import load_weights

    torch.manual_seed(1)
    trained = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(trained.state_dict(), tmp_path / "mine.pth")     # as a user saves theirs
    torch.manual_seed(2)
    model = load_weights(build_model("torchvision:resnet18", 10, 3, 32), tmp_path / "mine.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x)), "the saved model's logits, exactly"
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    with pytest.raises(RaykdError, match=r"fc.bias has shape \(1000,\), the model.s is "
                                         r"\(10,\).*weights_skip"):
        load_weights(build_model("torchvision:resnet18", 10, 3, 32), tmp_path / "imagenet.pth")
    # the head left out: everything else loads
    load_weights(build_model("torchvision:resnet18", 10, 3, 32), tmp_path / "imagenet.pth", ["fc"])
    torch.save({"conv9.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RaykdError, match="does not fit the model .missing bn1.bias"):
        load_weights(build_model("torchvision:resnet18", 10, 3, 32), tmp_path / "other.pth")
    (tmp_path / "code.pth").write_bytes(pickle.dumps(print))   # a pickled callable
    with pytest.raises(RaykdError, match="not a raykd file that can be loaded safely"):
        load_weights(build_model("torchvision:resnet18", 10, 3, 32), tmp_path / "code.pth")
    # from a job: a teacher that does not fit fails before any run
    job = small_job(tmp_path, data={"dataset": "gaussian", "gaussian": {"channels": 3}},
                    teacher={"model": "torchvision:resnet18", "weights": str(tmp_path / "imagenet.pth")})
    with pytest.raises(RaykdError, match="teacher.weights: .* fc.bias has shape"):
        from raykd.driver.plan import preflight
        spec = job_from_dict(job)
        preflight(spec, load_dataset(spec.data))


def test_a_factory_of_your_own_is_imported_only_because_a_job_names_it(tmp_path):
    import sys

    from raykd.job import factories

    name = "byo_factory:tiny_net"
    factories._ALLOWED.discard(name)
    with pytest.raises(RaykdError, match="imports a function of your own only when the job file names it"):
        build_model(name, 10, 1, 8)
    spec = job_from_dict(small_job(tmp_path, student={"model": name, "model_args": {"width": 4}}))
    model = build_model(spec.student.model, 10, 1, 8, spec.student.model_args)
    assert model.arch == name and model.stage_names == ["stage1", "stage2"]
    save_export(model, tmp_path / "own.pt", 10, 1, 8)
    # a model file alone never makes raykd import code: a fresh process refuses it
    code = ("import sys; from raykd.models.export import load_export\n"
            "try:\n    load_export(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "own.pt")],
                          capture_output=True, text=True, timeout=120)
    assert "imports a function of your own only when the job file names it" in done.stdout, done.stderr
    assert "byo_factory" not in done.stderr
    for bad, message in (("byo_factory:not_a_model", "returned str, not a torch.nn.Module"),
                         ("byo_factory:absent", "byo_factory has no function 'absent'"),
                         ("no_such_module:build", "cannot import no_such_module")):
        factories.allow([bad])
        with pytest.raises(RaykdError, match=message):
            build_model(bad, 10, 1, 8)


def test_a_factory_student_trains_in_the_jobs_ray_workers(ray_session, tmp_path):
    """The factory's folder reaches the workers through the run's runtime_env; from Python the
    factory may be given as the function itself."""
    import byo_factory

    job = small_job(tmp_path, name="own", methods={"kd": {"temperature": 4, "alpha": 0.9}},
                    student={"model": byo_factory.tiny_net, "train": {"epochs": 2, "lr": 0.1}})
    df = raykd.run(job)
    student = df[df.role == "student"].iloc[0]
    assert student.model == "byo_factory:tiny_net" and 0 <= student.test_top1 <= 1
    recorded = yaml.safe_load((tmp_path / "own" / "job.yaml").read_text())
    assert recorded["student"]["model"] == "byo_factory:tiny_net"   # a job `raykd run` re-runs


def test_callable_sources_are_named_as_a_job_file_would_name_them():
    """raykd.run takes torchvision builders and dataset classes, timm entry points and a
    module's functions as sources; one defined where Ray's processes cannot import it by name
    (a notebook cell, a lambda) is one line before any Ray work."""
    import byo_data
    import byo_factory
    import timm
    import torchvision

    from raykd.job.factories import named_sources

    raw = named_sources({"teacher": {"models": [timm.models.resnet18,
                                                torchvision.models.resnet18]},
                         "student": {"model": byo_factory.tiny_net},
                         "data": {"dataset": byo_data.digit_splits}})
    assert raw == {"teacher": {"models": ["timm:resnet18", "torchvision:resnet18"]},
                   "student": {"model": "byo_factory:tiny_net"},
                   "data": {"dataset": "byo_data:digit_splits"}}
    assert named_sources({"data": {"dataset": torchvision.datasets.FashionMNIST}}) == \
        {"data": {"dataset": "torchvision:FashionMNIST"}}

    def in_a_cell(num_classes):
        return byo_factory.tiny_net(num_classes)

    for bad in (in_a_cell, lambda num_classes: None):
        with pytest.raises(RaykdError, match=r"^student.model: .* put it at the top of a module"):
            raykd.run({"student": {"model": bad}, "methods": {"kd": {}}})


def test_published_weights_by_name_load_from_the_local_caches_only(tmp_path, monkeypatch):
    """torchvision's `IMAGENET1K_V1` and timm's pretrained tags resolve to the files torchvision
    and timm would have downloaded, in torch's hub cache and the Hugging Face hub cache (here
    written by the test, with random weights); absent, one line says what to fetch."""
    import safetensors.torch
    import timm
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    job = {"teacher": {"model": "torchvision:resnet18", "weights": "IMAGENET1K_V1",
                       "weights_skip": ["fc"]},
           "student": {"model": "timm:resnet10t", "weights": "pretrained",
                       "weights_skip": ["fc"]}}
    for part, message in (("teacher", "resnet18-f37072fd.pth is not in torch's hub cache"),
                          ("student", "timm's resnet10t weights are not cached locally")):
        with pytest.raises(RaykdError, match=message) as err:
            job_from_dict(small_job(tmp_path, **{part: job[part]}))
        assert "never downloads" in str(err.value) and "\n" not in str(err.value)
    torch.manual_seed(0)
    published = torchvision.models.resnet18()         # as torchvision's download would be
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(published.state_dict(), hub / "resnet18-f37072fd.pth")
    snapshot = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    timm_published = timm.create_model("resnet10t")
    safetensors.torch.save_file(timm_published.state_dict(), str(snapshot / "model.safetensors"))
    spec = job_from_dict(small_job(tmp_path, data={"dataset": "gaussian", "gaussian": {
        "channels": 3, "image_size": 32}}, **job))
    assert spec.teacher.weights == str(hub / "resnet18-f37072fd.pth")
    assert spec.student.weights.endswith("model.safetensors")
    from raykd.models.weights import load_weights, original_keys

    for name, weights, original, key in (
            ("torchvision:resnet18", spec.teacher.weights, published, "layer3.1.conv2.weight"),
            ("timm:resnet10t", spec.student.weights, timm_published, "layer3.0.conv2.weight")):
        model = load_weights(build_model(name, 10, 3, 32), weights, ["fc"])
        found = {orig: model.state_dict()[k] for k, orig in original_keys(model).items()}
        assert torch.equal(found[key], original.state_dict()[key]), name
    for weights, message in (("IMAGENET1K_V9", "has no weights 'IMAGENET1K_V9'; allowed: "
                                               "IMAGENET1K_V1, DEFAULT"),):
        with pytest.raises(RaykdError, match=message):
            job_from_dict(small_job(tmp_path, teacher={"model": "torchvision:resnet18",
                                                       "weights": weights}))
    with pytest.raises(RaykdError, match="no pretrained tag 'in22k'; allowed: pretrained, "
                                         "c3_in1k"):
        job_from_dict(small_job(tmp_path, student={"model": "timm:resnet10t",
                                                   "weights": "in22k"}))


def test_token_neighbourhoods_of_a_vit_get_token_candidates(tmp_path):
    """Neighbourhood Distillation's candidates on a timm ViT, whose cuts carry tokens (N, L, C):
    the residual-MLP family reproduces each neighbourhood's output shape, stitches into a model
    that runs, and round-trips through its file; the depthwise family is one line."""
    from raykd.models.export import load_candidate, save_candidate
    from raykd.models.stitch import block_shapes, make_candidate, neighbourhoods, stitch

    vit = build_model("timm:vit_tiny_patch16_224", 10, 3, 32, {"img_size": 32, "patch_size": 8})
    shapes = block_shapes(vit, (3, 32, 32))
    parts = []
    for name, start, stop in neighbourhoods(vit, []):
        (enter, leave) = shapes[start][0], shapes[stop - 1][1]
        if len(enter) != 2:       # the last stage may end at the pooled features
            continue
        candidate = make_candidate("w0.5d1", enter, leave, relu_out=False)
        x = torch.randn(2, *enter)
        assert candidate(x).shape == (2, *leave), name
        parts.append((start, stop, candidate))
    assert len(parts) >= 2 and all(len(p[2].in_shape) == 2 for p in parts)
    student = stitch(vit, parts).eval()
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    save_candidate(parts[0][2], tmp_path / "part.pt")
    back = load_candidate(tmp_path / "part.pt").eval()
    x = torch.randn(2, *parts[0][2].in_shape)
    assert torch.equal(back(x), parts[0][2].eval()(x))
    with pytest.raises(RaykdError, match="depthwise .dw. candidates need feature maps"):
        make_candidate("dw1d1", parts[0][2].in_shape, parts[0][2].out_shape)
    with pytest.raises(RaykdError, match=r"candidates need feature maps \(C, H, W\) or tokens"):
        make_candidate("w0.5d1", (192, 4, 4), (17, 192))
    # planning: by default the stage from the patch embedding's maps to tokens stays the
    # teacher's; named, it is one line before any Ray work
    from raykd.models.stitch import candidate_neighbourhoods

    kept = candidate_neighbourhoods(vit, [], (3, 32, 32), ["w0.5d1"])
    assert [n for n, _, _ in kept] == [n for n, _, _ in neighbourhoods(vit, [])][1:]
    with pytest.raises(RaykdError, match="neighbourhood stage1: candidate w0.5d1: the "
                                         "neighbourhood goes from"):
        candidate_neighbourhoods(vit, ["stage1"], (3, 32, 32), ["w0.5d1"])

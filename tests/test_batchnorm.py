"""BatchNorm recalibration: running statistics recomputed from the model's own activations."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from raykd.models.batchnorm import recalibrate_batchnorm


def conv_bn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    for bn in (model[1], model[4]):     # statistics from somewhere else, as a stitched part has
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    return model.eval()


def test_running_statistics_become_the_averages_of_the_passs_batch_statistics():
    images = TensorDataset(torch.randn(40, 2, 6, 6) * 3 + 1, torch.zeros(40))
    model = conv_bn()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    used = recalibrate_batchnorm(model, images, batch_size=10, max_images=30)
    assert used == 30
    # by hand: the first 30 images in order, batches of 10, each BN's input in train mode
    x = images.tensors[0][:30]
    means, vars_ = {1: [], 4: []}, {1: [], 4: []}
    with torch.no_grad():
        for batch in x.split(10):
            a = model[0](batch)
            means[1].append(a.mean(dim=(0, 2, 3)))
            vars_[1].append(a.var(dim=(0, 2, 3), unbiased=True))
            h = model[3](torch.relu(nn.functional.batch_norm(
                a, None, None, model[1].weight, model[1].bias, training=True)))
            means[4].append(h.mean(dim=(0, 2, 3)))
            vars_[4].append(h.var(dim=(0, 2, 3), unbiased=True))
    for i in (1, 4):
        torch.testing.assert_close(model[i].running_mean, torch.stack(means[i]).mean(0))
        torch.testing.assert_close(model[i].running_var, torch.stack(vars_[i]).mean(0))
        assert model[i].momentum == 0.1           # restored for any training that follows
    assert not model.training                     # its mode restored
    for k, v in weights.items():                  # no weight moved
        assert torch.equal(model.state_dict()[k], v)


def test_nothing_changes_without_batchnorm_or_with_zero_images():
    images = TensorDataset(torch.randn(8, 2, 6, 6), torch.zeros(8))
    model = conv_bn()
    assert recalibrate_batchnorm(model, images, 4, max_images=0) == 0
    assert torch.equal(model[1].running_mean, torch.full((3,), 5.0))
    assert recalibrate_batchnorm(nn.Conv2d(2, 2, 1), images, 4, max_images=8) == 0
    # fewer images than asked for: all of them
    assert recalibrate_batchnorm(model, images, 4, max_images=100) == 8

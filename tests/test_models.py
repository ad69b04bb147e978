"""Every staged model: taps are what the forward computes there; counts pinned; torchvision parity."""
import pytest
import torch

from raykd.errors import RaykdError
from raykd.models import build_model, count_macs, count_params

# name, in_channels, image size, stage count
ZOO = [
    ("resnet8", 3, 32, 3), ("resnet14", 3, 32, 3), ("resnet20", 3, 32, 3), ("resnet32", 3, 32, 3),
    ("resnet56", 3, 32, 3), ("resnet110", 3, 32, 3), ("resnet8x4", 3, 32, 3),
    ("resnet32x4", 3, 32, 3), ("wrn_16_2", 3, 32, 3), ("wrn_40_2", 3, 32, 3),
    ("cnn_small", 1, 28, 3), ("cnn", 1, 28, 3), ("cnn_wide", 1, 28, 3), ("cnn", 1, 8, 3),
    ("resnet18", 3, 64, 4), ("resnet34", 3, 64, 4), ("resnet50_cifar", 3, 32, 4),
    ("resnet152_cifar", 3, 32, 4),
]


@pytest.mark.parametrize("name,channels,size,stages", ZOO, ids=[f"{z[0]}-{z[2]}" for z in ZOO])
def test_staged_model_protocol(name, channels, size, stages):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    x = torch.randn(2, channels, size, size)
    # what the plain forward computes at each stage's block, seen through forward hooks (a
    # mechanism independent of features())
    seen = {}
    hooks = [model.blocks[model.stages[s]].register_forward_hook(
        lambda _m, _i, out, s=s: seen.__setitem__(s, out.detach().clone()))
        for s in model.stage_names]
    with torch.no_grad():
        logits = model(x)
        for h in hooks:
            h.remove()
        assert logits.shape == (2, 7)
        assert model.stage_names == [f"stage{i}" for i in range(1, stages + 1)]
        taps = model.features(x, model.stage_names + ["logits"])
        assert set(taps) == set(model.stage_names) | {"logits"}
        assert torch.allclose(taps["logits"], logits, atol=1e-5)
        for stage in model.stage_names:
            assert torch.allclose(taps[stage], seen[stage], atol=1e-5), stage
        # spatial size falls (or stays) from stage to stage
        sizes = [taps[s].shape[-1] for s in model.stage_names]
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet34", 64)])
def test_torchvision_resnets_compute_what_torchvision_computes(name, size):
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=7).eval()
    torch.manual_seed(0)
    ours = build_model(name, 7, 3, size).eval()
    ours.load_state_dict(dict(zip(ours.state_dict(), reference.state_dict().values())))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)
        assert torch.allclose(ours.features(x, ["stage2"])["stage2"],
                              reference.layer2(reference.layer1(reference.maxpool(reference.relu(
                                  reference.bn1(reference.conv1(x)))))), atol=1e-5)


def test_known_parameter_counts():
    # RepDistiller's CIFAR-100 models: resnet8 0.08M, resnet110 1.73M, resnet32x4 7.43M,
    # wrn_40_2 2.25M (published counts, rounded)
    counts = {n: count_params(build_model(n, 100))
              for n in ("resnet8", "resnet110", "resnet32x4", "wrn_40_2")}
    assert round(counts["resnet8"] / 1e6, 2) == 0.08
    assert round(counts["resnet110"] / 1e6, 2) == 1.74
    assert round(counts["resnet32x4"] / 1e6, 2) == 7.43
    assert round(counts["wrn_40_2"] / 1e6, 2) == 2.26


# Today's zoo figures (MACs per image); resnet56 and resnet32x4 match the published 125.75M and
# 1.08G, wrn_40_2 RepDistiller's 0.33G.
ZOO_MACS = [
    ("resnet8", 3, 32, 100, 12_507_392), ("resnet56", 3, 32, 100, 125_753_600),
    ("resnet110", 3, 32, 100, 253_155_584), ("resnet8x4", 3, 32, 100, 177_071_104),
    ("resnet32x4", 3, 32, 100, 1_083_040_768), ("wrn_16_2", 3, 32, 100, 101_118_464),
    ("wrn_40_2", 3, 32, 100, 327_610_880), ("cnn_small", 1, 28, 10, 959_936),
    ("cnn", 1, 28, 10, 3_726_208), ("cnn_wide", 1, 28, 10, 43_580_416),
    ("cnn_small", 1, 8, 10, 78_656), ("resnet18", 3, 64, 10, 148_050_944),
    ("resnet50_cifar", 3, 32, 100, 1_298_014_208),
]


@pytest.mark.parametrize("name,channels,size,classes,macs", ZOO_MACS,
                         ids=[f"{z[0]}-{z[2]}" for z in ZOO_MACS])
def test_zoo_macs_are_pinned(name, channels, size, classes, macs):
    assert count_macs(build_model(name, classes, channels, size), (channels, size, size)) == macs


def test_macs_by_hand_and_mode_restored():
    # conv 2->4 (3x3, pad 1) on 5x5: 5*5*4 outputs x 2*9 = 1800; linear 100->3: 300
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(100, 3)).train()
    assert count_macs(model, (2, 5, 5)) == 1800 + 300
    assert model.training


def test_features_from_a_shard_range_only_returns_its_taps():
    model = build_model("resnet8", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    mid = model.block_index("stage2")
    with torch.no_grad():
        entering = model.run_blocks(x, 0, mid)
        part = model.features_from(entering, ["stage1", "stage2", "logits"], start=mid,
                                   stop=mid + 1)
    assert set(part) == {"stage2"}


def test_unknown_tap_and_model_errors_name_the_allowed_values():
    model = build_model("resnet8", 10)
    with pytest.raises(RaykdError, match="stage1, stage2, stage3, logits"):
        model.features(torch.zeros(1, 3, 32, 32), ["stage9"])
    with pytest.raises(RaykdError, match="unknown model 'resnet9'.*resnet8"):
        build_model("resnet9", 10)
    with pytest.raises(RaykdError, match="unknown model"):
        build_model("wrn_15_2", 10)


def test_macs_equal_pytorchs_flop_counter_beyond_the_zoo():
    """count_macs counts with hooks on conv and linear layers; PyTorch's FlopCounterMode counts
    every op. They agree on what raykd builds besides the zoo (ND candidates of both families,
    DIH heads) and on grouped, strided and transposed convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    from raykd.models.heads import StageHead
    from raykd.models.stitch import Candidate

    def flop_counter_macs(model, shape):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, *shape))
        return counter.get_total_flops() // 2

    cases = [(Candidate("w0.5d2", (32, 14, 14), (64, 7, 7)), (32, 14, 14)),
             (Candidate("dw2d1", (64, 7, 7), (128, 3, 3)), (64, 7, 7)),
             (Candidate("w0.5d2", (32, 14, 14), (64, 7, 7), pool=True), (32, 14, 14)),
             (StageHead((32, 14, 14), 10), (32, 14, 14)),
             (torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, groups=2),
                                  torch.nn.ConvTranspose2d(8, 4, 4, stride=2, groups=2)),
              (4, 9, 9))]
    for model, shape in cases:
        assert count_macs(model, shape) == flop_counter_macs(model, shape) > 0


def test_measuring_a_wrapper_leaves_the_wrapped_teacher_in_eval_mode():
    """A BlockRange (or a stitched model) around a frozen teacher's blocks is itself in training
    mode; helpers that switch to eval and back restore every submodule's own mode, so measuring
    it does not switch the teacher's BatchNorms to batch statistics."""
    from raykd.models.staged import BlockRange, mode, tap_shapes
    from raykd.train.batches import evaluate

    teacher = build_model("cnn", 10, 1, 8).eval()
    wrapper = BlockRange(teacher, 1, 3)
    assert wrapper.training
    count_macs(wrapper, (16, 8, 8))
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8).long())
    evaluate(torch.nn.Sequential(teacher), data, 4, "cpu")
    tap_shapes(teacher, ["stage1"], (1, 8, 8))
    assert wrapper.training and not any(m.training for m in teacher.modules())
    with mode(wrapper, True):
        assert all(m.training for m in teacher.modules())
    assert not any(m.training for m in teacher.modules())

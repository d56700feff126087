"""Models: shapes, parameter counts against the papers, initialization, seeding, the paper hyperparameters."""
import math

import pytest
import torch
import torch.nn as nn

from sparse_lth.models import (MODEL_NAMES, PAPER_HPARAMS, build_model, count_parameters, default_dataset,
                               is_import_path, paper_hparams)

# Exact counts of the architectures as built (weights + biases + BN affine, 10 classes), computed by hand in
# test_lenet_count_by_formula / the models docstring, and the LTH paper's figures (Figure 2 / PAPERS.md).
EXACT = {"lenet300_100": 266_610, "conv2": 4_301_642, "conv4": 2_425_930, "conv6": 2_262_602,
         "vgg19": 20_040_522, "resnet20": 272_474, "resnet18": 11_173_962}
PAPER = {"lenet300_100": 266e3, "conv2": 4.3e6, "conv4": 2.4e6, "vgg19": 20.0e6, "resnet20": 274e3}


def _forward(model, batch=2, **kw):
    x = torch.randn(batch, *model.input_shape)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_with_attributes_and_output_shape(name):
    model = build_model(name, num_classes=7, seed=0)
    out = _forward(model, batch=3)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert model.dataset == ("mnist" if name == "lenet300_100" else "cifar10")
    assert model.input_shape == ((1, 28, 28) if name == "lenet300_100" else (3, 32, 32))
    out_layer = model.get_submodule(model.output_layer)
    assert type(out_layer) is nn.Linear and out_layer.out_features == 7
    # the output layer is the last linear layer the forward uses
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear == model.output_layer
    # every layer that holds parameters is a plain Linear / Conv2d / BatchNorm2d, so sparsify() can swap them
    for n, m in model.named_modules():
        if list(m.parameters(recurse=False)):
            assert type(m) in (nn.Linear, nn.Conv2d, nn.BatchNorm2d), (n, type(m))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_width_scales_hidden_layers(name):
    half = build_model(name, width=0.5, seed=0)
    quarter = build_model(name, width=0.25, seed=0)
    tiny = build_model(name, width=1e-3, seed=0)  # every hidden width clamps to 1
    assert _forward(quarter).shape == (2, 10) and _forward(tiny).shape == (2, 10)
    n_half, n_quarter = count_parameters(half), count_parameters(quarter)
    assert n_quarter < 0.5 * n_half  # most weights are products of two hidden widths
    for m in tiny.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == 1
    assert tiny.get_submodule(tiny.output_layer).in_features == 1


def test_width_rounding():
    m = build_model("lenet300_100", width=0.25)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features, m.fc3.out_features) == (784, 75, 25, 10)
    m = build_model("conv2", width=1.5)
    assert m.features.conv1.out_channels == 96 and m.fc1.out_features == 384
    assert m.fc1.in_features == 96 * 16 * 16
    m = build_model("resnet20", width=2)
    assert m.conv.out_channels == 32 and m.fc.in_features == 128
    m = build_model("vgg11", width=0.5)
    assert m.fc.in_features == 256


def test_lenet_count_by_formula():
    expect = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    assert expect == 266_610
    assert count_parameters(build_model("lenet300_100")) == expect


@pytest.mark.parametrize("name", sorted(EXACT))
def test_parameter_counts(name):
    n = count_parameters(build_model(name))
    assert n == EXACT[name]
    if name in PAPER:  # the paper's rounded figure; Conv-6's "1.7M" does not follow from its architecture
        assert abs(n - PAPER[name]) / PAPER[name] < 0.015, (n, PAPER[name])
    if name == "resnet20":
        assert 272_000 <= n <= 274_000


def test_layer_structure():
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    r20 = build_model("resnet20")
    assert count(r20, nn.Conv2d) == 1 + 18 + 2 and count(r20, nn.Linear) == 1   # stem, 9 blocks x 2, 2 shortcuts
    assert all(m.kernel_size == (1, 1) for n, m in r20.named_modules() if "shortcut" in n
               and isinstance(m, nn.Conv2d))
    r18 = build_model("resnet18")
    assert count(r18, nn.Conv2d) == 1 + 16 + 3 and count(r18, nn.Linear) == 1
    for name, convs in (("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)):
        m = build_model(name)
        assert count(m, nn.Conv2d) == convs and count(m, nn.BatchNorm2d) == convs
        assert count(m, nn.Linear) == 1 and m.fc.in_features == 512 and m.output_layer == "fc"
    for name, convs in (("conv2", 2), ("conv4", 4), ("conv6", 6)):
        m = build_model(name)
        assert count(m, nn.Conv2d) == convs and count(m, nn.MaxPool2d) == convs // 2
        assert [m.fc1.out_features, m.fc2.out_features, m.fc3.out_features] == [256, 256, 10]
        assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in m.modules() if isinstance(c, nn.Conv2d))


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = build_model("conv4", seed=123)
    assert torch.equal(torch.get_rng_state(), state)  # seeding does not disturb the caller's RNG
    b = build_model("conv4", seed=123)
    c = build_model("conv4", seed=124)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc1.weight"], sc["fc1.weight"])
    # without a seed, the global RNG decides
    torch.manual_seed(7)
    d = build_model("resnet20")
    torch.manual_seed(7)
    e = build_model("resnet20")
    assert all(torch.equal(v, e.state_dict()[k]) for k, v in d.state_dict().items())


def test_initialization():
    torch.manual_seed(0)
    lenet = build_model("lenet300_100", seed=1)
    std = math.sqrt(2.0 / (784 + 300))  # Glorot normal
    assert abs(lenet.fc1.weight.std().item() / std - 1) < 0.02
    assert abs(lenet.fc1.weight.mean().item()) < 0.01 * std * 10
    assert torch.count_nonzero(lenet.fc1.bias) == 0
    conv2 = build_model("conv2", seed=1)
    w = conv2.features.conv2.weight
    assert abs(w.std().item() / math.sqrt(2.0 / (64 * 9 + 64 * 9)) - 1) < 0.03
    r20 = build_model("resnet20", seed=1)
    w = r20.blocks[8].conv1.weight  # 64 -> 64, fan_in 576
    assert abs(w.std().item() / math.sqrt(2.0 / 576) - 1) < 0.03   # Kaiming normal, fan-in
    bns = [m for m in r20.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    uni = build_model("resnet20", seed=1, bn_init="uniform")
    ws = torch.cat([m.weight.detach() for m in uni.modules() if isinstance(m, nn.BatchNorm2d)])
    assert ws.min() >= 0 and ws.max() <= 1 and ws.std() > 0.1
    vgg = build_model("vgg11", seed=1)
    b = vgg.layers[0].conv.bias  # PyTorch default bias init, as open_lth: U(-1/sqrt(27), 1/sqrt(27))
    assert b.abs().max() <= 1 / math.sqrt(27) and b.abs().max() > 0


def test_dropout_on_hidden_fc_layers():
    m = build_model("lenet300_100", dropout=0.5, seed=0)
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) >= 1
    x = torch.randn(4, 1, 28, 28)
    m.train()
    torch.manual_seed(0)
    y1 = m(x)
    y2 = m(x)
    assert not torch.equal(y1, y2)
    m.eval()
    assert torch.equal(m(x), m(x))
    c = build_model("conv2", dropout=0.3)
    assert any(isinstance(x, nn.Dropout) and x.p == 0.3 for x in c.modules())
    assert not any(isinstance(x, nn.Dropout) for x in build_model("conv2").modules())


def test_backward_through_a_residual_net():
    m = build_model("resnet20", seed=0, width=0.5)
    m.train()
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.conv.weight.grad.abs().sum() > 0


def test_in_channels():
    m = build_model("lenet300_100", in_channels=3)
    assert m.input_shape == (3, 28, 28) and m.fc1.in_features == 3 * 784
    m = build_model("resnet18", in_channels=1)
    assert m.input_shape == (1, 32, 32) and _forward(m).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_input_shape_of_mnist(name):
    """Every network runs on MNIST/Fashion-MNIST's (1, 28, 28) examples; the layers after the convolutions take
    the smaller maps (Conv-2: 64 x 14 x 14 into fc1 instead of 64 x 16 x 16)."""
    m = build_model(name, input_shape=(1, 28, 28), seed=0)
    assert m.input_shape == (1, 28, 28) and m.dataset == ("mnist" if name == "lenet300_100" else "cifar10")
    out = _forward(m, batch=3)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    pooled = {"conv2": 64 * 14 * 14, "conv4": 128 * 7 * 7, "conv6": 256 * 3 * 3, "lenet300_100": 784}
    if name in pooled:
        assert m.fc1.in_features == pooled[name]
    # the default is the model's own dataset, unchanged
    assert build_model(name, seed=0).input_shape == ((1, 28, 28) if name == "lenet300_100" else (3, 32, 32))
    assert count_parameters(build_model(name, input_shape=build_model(name).input_shape)) == \
        count_parameters(build_model(name))


def test_vgg_global_pool_is_cifars_2x2_pool():
    """VGG's final pool became a global one so that 28x28 inputs work; on CIFAR's 2x2 maps it is bit for bit the
    2x2 average pool open_lth uses, forward and backward."""
    m = build_model("vgg11", width=0.25, seed=0).train()
    x = torch.randn(4, 3, 32, 32)
    feats = m.layers(x)
    assert feats.shape[-2:] == (2, 2)
    ref = m.fc(torch.nn.functional.avg_pool2d(feats, 2).flatten(1))
    assert torch.equal(m(x), ref)
    f1 = feats.detach().requires_grad_()
    f2 = feats.detach().requires_grad_()
    torch.nn.functional.avg_pool2d(f1, 2).square().sum().backward()
    torch.nn.functional.adaptive_avg_pool2d(f2, 1).square().sum().backward()
    assert torch.equal(f1.grad, f2.grad)


def test_a_model_of_ones_own_by_import_path():
    """"package.module:callable": called under the seed (same seed, same weights), given num_classes (also through
    **kwargs, as torchvision's builders take it) and input_shape when it names them."""
    m = build_model("user_models:small_cnn", num_classes=7, input_shape=(1, 12, 10), seed=3)
    assert m.model_name == "user_models:small_cnn" and m.input_shape == (1, 12, 10) and m.num_classes == 7
    assert _forward(m).shape == (2, 7) and m[4].in_features == 4 * 6 * 5
    again = build_model("user_models:small_cnn", num_classes=7, input_shape=(1, 12, 10), seed=3)
    other = build_model("user_models:small_cnn", num_classes=7, input_shape=(1, 12, 10), seed=4)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))
    assert not torch.equal(m[0].weight, other[0].weight)
    tv = build_model("torchvision.models:resnet18", num_classes=5, seed=0)
    assert tv.fc.out_features == 5
    assert build_model("user_models:takes_nothing", num_classes=3)[1].out_features == 10  # called bare
    assert is_import_path("torchvision.models:resnet18") and not is_import_path("resnet18")


def test_a_model_of_ones_own_that_cannot_be_built_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        build_model("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_model("user_models:missing")
    with pytest.raises(ValueError, match="NOT_CALLABLE is not callable"):
        build_model("user_models:NOT_CALLABLE")
    with pytest.raises(ValueError, match="'package.module:callable'"):
        build_model("user_models:")
    with pytest.raises(ValueError, match="returned str, not an nn.Module"):
        build_model("user_models:not_a_module")

    with pytest.raises(ValueError, match="width, dropout and bn_init apply to the built-in networks only"):
        build_model("user_models:small_cnn", width=0.5)
    with pytest.raises(ValueError, match="give its dataset"):
        default_dataset("user_models:small_cnn")
    with pytest.raises(ValueError, match="or a model of your own as 'package.module:callable'"):
        default_dataset("resnet50")


def test_a_model_of_ones_own_whose_code_fails_is_a_model_error(tmp_path, monkeypatch):
    """The user's module failing at import (a SyntaxError) or its callable raising: a ValueError naming the model,
    which the CLI prints as an error (it printed a traceback of TypeError / SyntaxError)."""
    (tmp_path / "broken_user_model.py").write_text("def f(num_classes=10):\n    return (\n")
    (tmp_path / "raising_user_model.py").write_text("def f(num_classes=10):\n    raise TypeError('no such option')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing 'broken_user_model' failed: SyntaxError"):
        build_model("broken_user_model:f")
    with pytest.raises(ValueError, match=r"calling f\(num_classes\) raised TypeError: no such option"):
        build_model("raising_user_model:f")

def test_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("conv2", input_shape=(28, 28))
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("conv2", input_shape=(1, 28, 0))
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("conv2", input_shape=(1.0, 28, 28))
    with pytest.raises(ValueError, match="disagrees"):
        build_model("conv2", in_channels=3, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="vgg19 halves the image 4 times: it needs at least 16x16"):
        build_model("vgg19", input_shape=(3, 15, 32))
    with pytest.raises(ValueError, match="conv6 halves the image 3 times"):
        build_model("conv6", input_shape=(1, 7, 7))
    assert _forward(build_model("conv6", input_shape=(1, 8, 8), width=0.1)).shape == (2, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lenet300_100.*resnet18"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("VGG19")
    with pytest.raises(ValueError, match="width"):
        build_model("conv2", width=0)
    with pytest.raises(ValueError, match="width"):
        build_model("conv2", width=-1.0)
    with pytest.raises(ValueError, match="width"):
        build_model("conv2", width=float("nan"))
    with pytest.raises(ValueError, match="dropout"):
        build_model("lenet300_100", dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("lenet300_100", dropout=-0.1)
    with pytest.raises(ValueError, match="no hidden fully-connected"):
        build_model("vgg19", dropout=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        build_model("resnet20", num_classes=10.0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet20", in_channels=0)
    with pytest.raises(ValueError, match="bn_init"):
        build_model("resnet20", bn_init="zeros")
    with pytest.raises(TypeError, match="seed"):
        build_model("resnet20", seed=1.5)


KEYS = {"dataset", "model", "optimizer", "lr", "momentum", "batch_size", "iterations", "milestones", "gamma",
        "warmup", "weight_decay", "dropout", "prune_fc", "prune_conv", "prune_output", "prune_global"}


def test_paper_hparams_cover_every_model_and_agree_with_the_models():
    for name in MODEL_NAMES:
        assert name in PAPER_HPARAMS
    for key, hp in PAPER_HPARAMS.items():
        assert set(hp) == KEYS, key
        assert hp["model"] in MODEL_NAMES and key.startswith(hp["model"])
        assert hp["dataset"] == build_model(hp["model"], width=0.05).dataset
        assert hp["optimizer"] in ("adam", "sgd")
        assert all(0 < m < hp["iterations"] for m in hp["milestones"])
        assert hp["milestones"] == sorted(hp["milestones"])
        assert 0 <= hp["warmup"] < hp["iterations"]
        for k in ("prune_fc", "prune_conv", "prune_output"):
            assert 0.0 <= hp[k] < 1.0


def test_paper_hparams_values():
    le = PAPER_HPARAMS["lenet300_100"]
    assert (le["optimizer"], le["lr"], le["batch_size"], le["iterations"]) == ("adam", 1.2e-3, 60, 50_000)
    assert (le["prune_fc"], le["prune_output"], le["prune_global"]) == (0.2, 0.1, False)
    for name, lr, it, conv in (("conv2", 2e-4, 20_000, 0.1), ("conv4", 3e-4, 25_000, 0.1),
                               ("conv6", 3e-4, 30_000, 0.15)):
        hp = PAPER_HPARAMS[name]
        assert (hp["optimizer"], hp["lr"], hp["iterations"], hp["batch_size"]) == ("adam", lr, it, 60)
        assert (hp["prune_conv"], hp["prune_fc"], hp["prune_output"]) == (conv, 0.2, 0.1)
    r = PAPER_HPARAMS["resnet20"]
    assert (r["optimizer"], r["momentum"], r["lr"], r["batch_size"], r["iterations"]) == ("sgd", 0.9, 0.1, 128,
                                                                                           30_000)
    assert r["milestones"] == [20_000, 25_000] and r["gamma"] == 0.1 and r["weight_decay"] == 1e-4
    assert (r["prune_conv"], r["prune_fc"], r["prune_output"], r["prune_global"]) == (0.2, 0.0, 0.0, True)
    v = PAPER_HPARAMS["vgg19"]
    assert (v["lr"], v["batch_size"], v["iterations"], v["momentum"]) == (0.1, 64, 112_000, 0.9)
    assert v["milestones"] == [80 * 782, 120 * 782] == [62_560, 93_840]
    assert v["prune_global"] and v["prune_conv"] == 0.2 and v["prune_fc"] == 0.0
    assert PAPER_HPARAMS["resnet20_warmup"]["lr"] == 0.03 and PAPER_HPARAMS["resnet20_warmup"]["warmup"] == 20_000
    assert PAPER_HPARAMS["vgg19_warmup"]["lr"] == 0.1 and PAPER_HPARAMS["vgg19_warmup"]["warmup"] == 10_000
    assert PAPER_HPARAMS["resnet20_lowlr"]["lr"] == 0.01 and PAPER_HPARAMS["resnet20_lowlr"]["warmup"] == 0
    assert PAPER_HPARAMS["vgg19_lowlr"]["lr"] == 0.01
    # the variants do not share mutable state with their base entries
    assert PAPER_HPARAMS["vgg19_lowlr"]["milestones"] is not v["milestones"]
    hp = paper_hparams("vgg19")
    hp["milestones"].append(1)
    assert PAPER_HPARAMS["vgg19"]["milestones"] == [62_560, 93_840]
    with pytest.raises(ValueError, match="no paper hyperparameters"):
        paper_hparams("alexnet")


def test_initializations_follow_their_distributions_where_fan_in_and_fan_out_differ():
    """Kaiming normal with fan_in (a 16 -> 32 conv and the fc), Xavier normal (not uniform: the same std), BN weights
    U(0, 1), the bias bound 1/sqrt(fan_in): the tests looked where fan_in equals fan_out, or at std and mean only."""
    from sparse_lth.models import build_model
    r20 = build_model("resnet20", seed=1)
    w = r20.blocks[3].conv1.weight  # 16 -> 32, fan_in 144, fan_out 288
    assert abs(w.std().item() / math.sqrt(2.0 / 144) - 1) < 0.05          # M1 fan_in
    assert abs(r20.fc.weight.std().item() / math.sqrt(2.0 / 64) - 1) < 0.1  # M1 (fc: fan_in 64, fan_out 10)
    lenet = build_model("lenet300_100", seed=1)
    std = math.sqrt(2.0 / (784 + 300))
    assert lenet.fc1.weight.abs().max().item() / std > 3.5                  # M2 normal, not uniform (max sqrt(3))
    uni = build_model("resnet20", seed=1, bn_init="uniform")
    ws = torch.cat([m.weight.detach() for m in uni.modules() if isinstance(m, nn.BatchNorm2d)])
    assert ws.min() < 0.05 and abs(ws.mean().item() - 0.5) < 0.05          # M4 U(0, 1)
    assert 0.9 / 8 < r20.fc.bias.abs().max().item() <= 1 / 8                 # M13 bias bound 1/sqrt(fan_in=64)


def test_a_width_multiplier_rounds_layer_sizes():
    """256 * 0.3 = 76.8 units: 77 (round), not 76 (every test used width 0.5, whole numbers)."""
    from sparse_lth.models import build_model
    assert build_model("conv2", width=0.3, seed=0).fc1.out_features == 77  # round(256 * 0.3), not floor

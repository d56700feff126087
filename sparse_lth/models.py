"""The networks of the lottery-ticket papers, and the papers' training/pruning settings as plain data.

Models (all built from plain ``nn.Linear`` / ``nn.Conv2d``, so that ``sparsify(model)`` can swap them later):

============== ========= ============================================================================== ==========
name           dataset   architecture                                                                   weights
============== ========= ============================================================================== ==========
lenet300_100   mnist     flatten 784 -> fc 300 -> fc 100 -> fc 10, ReLU                                 266,610
conv2          cifar10   conv 64,64, pool; fc 256,256,10 (3x3 convs pad 1, ReLU, 2x2 max-pool per pair) 4,301,642
conv4          cifar10   conv 64,64, pool, 128,128, pool; fc 256,256,10                                 2,425,930
conv6          cifar10   conv 64,64, pool, 128,128, pool, 256,256, pool; fc 256,256,10                  2,262,602
vgg11..vgg19   cifar10   open_lth's cifar_vgg: 3x3 conv+BN+ReLU, 2x2 max-pools, 2x2 avg-pool, fc 512->10 20,040,522
                         (VGG-19); a single linear output layer, no hidden FC layers
resnet20       cifar10   open_lth's cifar_resnet_20: 3x3 stem conv 16, 3 stages x 3 basic blocks          272,474
                         (16/32/64 ch), BN, 1x1-conv+BN shortcut when downsampling, global avg-pool, fc 64->10
resnet18       cifar10   ResNet-18 for CIFAR (He et al. 2016 / the common CIFAR port): 3x3 stem conv 64,  11,173,962
                         4 stages x 2 basic blocks (64/128/256/512, strides 1/2/2/2), 1x1-conv+BN
                         shortcuts, global avg-pool, fc 512->10
============== ========= ============================================================================== ==========

(Counts include biases and BatchNorm affine parameters, at width 1 and 10 classes, on the dataset named; every
network also takes MNIST/Fashion-MNIST's 1x28x28 images with ``input_shape=(1, 28, 28)``, which IMP and the CLI
pass for those datasets: Conv-2 then has 3,317,450 weights, fc1 taking 64x14x14.) The paper's table gives 266K,
4.3M, 2.4M, 1.7M, 20.0M and 274K. All match the architectures above except Conv-6: the architecture the paper
describes (and that this module builds) has 2.26M weights; the paper's "1.7M" does not follow from it.

Initialization (every parameter is set explicitly, so a seed fixes all of them):

- LeNet-300-100 and Conv-2/4/6: Glorot/Xavier *normal* weights (the LTH paper: "Gaussian Glorot initialization"),
  biases zero.
- VGG and ResNets: Kaiming (He) normal weights, fan-in, gain sqrt(2) (open_lth's ``kaiming_normal``, its default
  for these models), for every conv and linear layer; conv/linear biases (VGG's convs and every fc) keep
  PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as open_lth leaves them; BatchNorm weight 1 and bias 0
  (``bn_init="fixed"``, the default here), or open_lth's default ``bn_init="uniform"``: weight U(0, 1), bias 0.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODEL_NAMES", "PAPER_HPARAMS", "build_model", "default_dataset", "is_import_path", "paper_hparams",
           "count_parameters"]

MODEL_NAMES: tuple[str, ...] = ("lenet300_100", "conv2", "conv4", "conv6", "vgg11", "vgg13", "vgg16", "vgg19",
                                "resnet20", "resnet18")

_MNIST_SHAPE = (28, 28)
_CIFAR_SHAPE = (32, 32)
_BN_INITS = ("fixed", "uniform")


def _scale(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


# --------------------------------------------------------------------------------------------------------------
# initialization
# --------------------------------------------------------------------------------------------------------------
def _init_glorot(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _init_kaiming(model: nn.Module, bn_init: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight)  # fan_in, gain sqrt(2): open_lth's kaiming_normal
            if m.bias is not None:  # PyTorch's default bias init, which open_lth keeps
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound)
        elif isinstance(m, nn.BatchNorm2d):
            if bn_init == "uniform":
                nn.init.uniform_(m.weight, 0.0, 1.0)
            else:
                nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------------------------
class LeNet300_100(nn.Module):
    """LeNet-300-100: flatten -> fc1 (300) -> ReLU -> fc2 (100) -> ReLU -> fc3 (classes); dropout after the
    hidden ReLUs when ``dropout > 0``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.0, in_channels: int = 1,
                 image_size: tuple[int, int] = _MNIST_SHAPE):
        super().__init__()
        h1, h2 = _scale(300, width), _scale(100, width)
        self.fc1 = nn.Linear(in_channels * image_size[0] * image_size[1], h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


class ConvN(nn.Module):
    """Conv-2/4/6 of the LTH paper: pairs of 3x3 convs (padding 1, ReLU) each followed by a 2x2 max-pool, then
    fc1 (256) -> ReLU -> fc2 (256) -> ReLU -> fc3 (classes); dropout after the hidden fc ReLUs. fc1 takes the
    last pool's output, whose size follows from ``image_size`` (32x32 -> 16x16 for Conv-2; 28x28 -> 14x14)."""

    def __init__(self, plan: list[int], num_classes: int = 10, width: float = 1.0, dropout: float = 0.0,
                 in_channels: int = 3, image_size: tuple[int, int] = _CIFAR_SHAPE):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c = in_channels
        for i, ch in enumerate(plan):
            ch = _scale(ch, width)
            layers[f"conv{i + 1}"] = nn.Conv2d(c, ch, kernel_size=3, padding=1)
            layers[f"relu{i + 1}"] = nn.ReLU()
            if i % 2 == 1:
                layers[f"pool{i // 2 + 1}"] = nn.MaxPool2d(2)
            c = ch
        self.features = nn.Sequential(layers)
        pools = len(plan) // 2
        h, w = image_size[0] // 2 ** pools, image_size[1] // 2 ** pools
        hidden = _scale(256, width)
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


class _ConvBN(nn.Module):
    """conv 3x3 (padding 1, with bias, as open_lth) -> BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


_VGG_PLANS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """VGG for CIFAR-10 as open_lth's ``cifar_vgg_N``: conv+BN+ReLU modules and 2x2 max-pools (4 pools: 32 -> 2),
    a 2x2 average pool (-> 1x1), and a single linear output layer ``fc`` (512 -> classes). No hidden FC layers,
    hence no dropout. The average pool is a global one (on CIFAR's 2x2 maps it is the same 2x2 pool, bit for
    bit), so other image sizes (28x28: 1x1 maps) work too."""

    def __init__(self, plan: list, num_classes: int = 10, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                ch = _scale(spec, width)
                layers.append(_ConvBN(c, ch))
                c = ch
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """A ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut (identity, or 1x1 conv with the
    block's stride + BN when the shape changes, as open_lth), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem conv (no bias) + BN + ReLU, stages of basic blocks (the first block of
    every stage but the first downsamples by 2), global average pool, linear output ``fc``.

    ``plan`` is a list of (channels, blocks): ResNet-20 = [(16, 3), (32, 3), (64, 3)] (stem 16 channels);
    ResNet-18 = [(64, 2), (128, 2), (256, 2), (512, 2)] (stem 64 channels)."""

    def __init__(self, plan: list[tuple[int, int]], num_classes: int = 10, width: float = 1.0,
                 in_channels: int = 3):
        super().__init__()
        c = _scale(plan[0][0], width)
        self.conv = nn.Conv2d(in_channels, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        blocks: list[nn.Module] = []
        for stage, (ch, n) in enumerate(plan):
            ch = _scale(ch, width)
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(c, ch, stride))
                c = ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------------------------------------------
# the factory
# --------------------------------------------------------------------------------------------------------------
def _check_number(name: str, value, kind, low, low_inclusive: bool, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind.__name__ if isinstance(kind, type) else 'a number'}, "
                        f"got {type(value).__name__}")
    bad = value < low if low_inclusive else value <= low
    if bad or (high is not None and value >= high) or (isinstance(value, float) and not math.isfinite(value)):
        rng = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")


def is_import_path(name) -> bool:
    """Whether ``name`` names a model of the user's own as ``"package.module:callable"``."""
    return isinstance(name, str) and ":" in name


def import_model_fn(path: str):
    """The callable that ``"package.module:callable"`` (``callable`` may be dotted: ``"mod:Class.build"``)
    names; a clear ValueError when it cannot be imported."""
    mod, _, attr = path.partition(":")
    if not mod or not attr:
        raise ValueError(f"model {path!r}: a model of your own is named 'package.module:callable'")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"model {path!r}: cannot import {mod!r} ({e}); it must be importable from where "
                         "sparse-lth runs (installed, or on PYTHONPATH)") from None
    except Exception as e:  # the module's own code failed (a SyntaxError, an error at import time)
        raise ValueError(f"model {path!r}: importing {mod!r} failed: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {path!r}: {mod} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {path!r}: {attr} is not callable")
    return obj


def default_dataset(name: str) -> str:
    """The dataset model ``name`` was made for in the papers: ``"mnist"`` for LeNet-300-100, else ``"cifar10"``.
    A model of your own (``"module:callable"``) has none: its dataset must be given."""
    if is_import_path(name):
        raise ValueError(f"model {name!r} is a model of your own: give its dataset (--dataset mnist|fashion_mnist|"
                         "cifar10)")
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}, or a model of your "
                         "own as 'package.module:callable'")
    return "mnist" if name == "lenet300_100" else "cifar10"


def _imported_call(name: str, *, num_classes: int, width: float, dropout: float, in_channels: int | None,
                   bn_init: str, input_shape) -> tuple:
    """``(fn, kwargs)`` for a model of the user's own: the callable ``name`` names, given ``num_classes`` when it
    takes that argument (or ``**kwargs``, as torchvision's builders do) and ``input_shape`` / ``in_channels`` when
    it names them."""
    if width != 1.0 or dropout != 0.0 or bn_init != "fixed":
        raise ValueError(f"model {name!r}: width, dropout and bn_init apply to the built-in networks only")
    fn = import_model_fn(name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): call it bare
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {}
    if "num_classes" in params or takes_any:
        kw["num_classes"] = num_classes
    if input_shape is not None and "input_shape" in params:
        kw["input_shape"] = tuple(input_shape)
    c = input_shape[0] if input_shape is not None else in_channels
    if c is not None and "in_channels" in params:
        kw["in_channels"] = c
    return fn, kw


def build_model(name: str, *, num_classes: int = 10, width: float = 1.0, dropout: float = 0.0,
                in_channels: int | None = None, seed: int | None = None, bn_init: str = "fixed",
                input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """Build one of :data:`MODEL_NAMES`, or a model of your own named ``"package.module:callable"`` (any callable
    that returns an ``nn.Module``, e.g. ``"torchvision.models:resnet18"``): it is called under the seed, given
    ``num_classes`` if it takes that argument or ``**kwargs``, and ``input_shape`` / ``in_channels`` if it names
    them; IMP finds its output layer as its ``output_layer`` attribute or else its last Linear layer.

    ``width`` scales every hidden width (``max(1, round(w * width))``; the input and output sizes stay).
    ``dropout`` is applied after the hidden fully-connected layers (LeNet, Conv-2/4/6); VGG and the ResNets have
    none, so ``dropout > 0`` is an error for them. ``input_shape`` = (C, H, W) of one example: the model's own
    dataset's by default ((1, 28, 28) for LeNet, (3, 32, 32) for the others); give (1, 28, 28) to run Conv-2/4/6,
    VGG or a ResNet on MNIST or Fashion-MNIST (the layer shapes after the convolutions follow from it; a VGG or
    Conv-N whose pools would shrink the image to nothing is refused). ``in_channels`` sets C alone (an older
    spelling; it must agree with ``input_shape`` if both are given).
    ``seed``: if given, every parameter is drawn under ``torch.manual_seed(seed)`` inside a forked RNG (the
    global RNG state is left untouched), so the same seed gives identical weights; if ``None`` the global RNG
    is used. ``bn_init``: ``"fixed"`` (BN weight 1, bias 0) or ``"uniform"`` (open_lth's default: U(0,1), 0).

    The model carries ``output_layer`` (module path of its output layer, e.g. ``"fc3"``), ``dataset``
    (``"mnist"`` or ``"cifar10"``), ``input_shape`` ((C, H, W)), ``model_name`` and ``num_classes``.
    """
    dataset = None if is_import_path(name) else default_dataset(name)
    _check_number("num_classes", num_classes, int, 1, True)
    _check_number("width", width, (int, float), 0, False)
    _check_number("dropout", dropout, (int, float), 0, True, 1)
    if in_channels is not None:
        _check_number("in_channels", in_channels, int, 1, True)
    if input_shape is not None:
        if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_shape)):
            raise ValueError(f"input_shape must be (C, H, W), three positive ints, got {input_shape!r}")
        input_shape = tuple(input_shape)
        if in_channels is not None and in_channels != input_shape[0]:
            raise ValueError(f"in_channels={in_channels} disagrees with input_shape={input_shape}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if bn_init not in _BN_INITS:
        raise ValueError(f"bn_init must be one of {_BN_INITS}, got {bn_init!r}")
    if dropout > 0 and (name.startswith("vgg") or name.startswith("resnet")):
        raise ValueError(f"{name} has no hidden fully-connected layers, so dropout={dropout} cannot apply; "
                         "use dropout=0.0")
    width = float(width)
    if dataset is None:  # a model of one's own: its input shape stays what was given (or None)
        fn, kw = _imported_call(name, num_classes=num_classes, width=width, dropout=float(dropout),
                                in_channels=in_channels, bn_init=bn_init, input_shape=input_shape)
    else:
        if input_shape is None:
            hw = _MNIST_SHAPE if dataset == "mnist" else _CIFAR_SHAPE
            input_shape = (in_channels or (1 if dataset == "mnist" else 3), *hw)
        in_channels, hw = input_shape[0], input_shape[1:]
        pools = {"conv2": 1, "conv4": 2, "conv6": 3}.get(name, 4 if name in _VGG_PLANS else 0)
        if min(hw) < 2 ** pools:
            raise ValueError(f"{name} halves the image {pools} times: it needs at least {2 ** pools}x{2 ** pools} "
                             f"pixels, got input_shape={input_shape}")

    def make() -> nn.Module:
        if dataset is None:
            try:
                m = fn(**kw)
            except Exception as e:  # the user's code: said as a model error, not a traceback of ours
                raise ValueError(f"model {name!r}: calling {getattr(fn, '__qualname__', fn)!s}("
                                 f"{', '.join(sorted(kw))}) raised {type(e).__name__}: {e}") from e
            if not isinstance(m, nn.Module):
                raise ValueError(f"model {name!r}: {fn!r} returned {type(m).__name__}, not an nn.Module")
            out = None  # IMP takes its output_layer attribute if it names one, else its last Linear
        elif name == "lenet300_100":
            m, out = LeNet300_100(num_classes, width, dropout, in_channels, hw), "fc3"
            _init_glorot(m)
        elif name in ("conv2", "conv4", "conv6"):
            plan = [64, 64, 128, 128, 256, 256][: int(name[-1])]
            m, out = ConvN(plan, num_classes, width, dropout, in_channels, hw), "fc3"
            _init_glorot(m)
        elif name in _VGG_PLANS:
            m, out = VGG(_VGG_PLANS[name], num_classes, width, in_channels), "fc"
            _init_kaiming(m, bn_init)
        else:
            plan = [(16, 3), (32, 3), (64, 3)] if name == "resnet20" else [(64, 2), (128, 2), (256, 2), (512, 2)]
            m, out = CifarResNet(plan, num_classes, width, in_channels), "fc"
            _init_kaiming(m, bn_init)
        return m, out

    if seed is None:
        model, output_layer = make()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, output_layer = make()
    for attr, value in (("output_layer", output_layer), ("dataset", dataset), ("input_shape", input_shape)):
        if value is not None:  # (a model of one's own keeps its attributes of those names)
            setattr(model, attr, value)
    model.model_name = name
    model.num_classes = num_classes
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements (weights, biases, BN affine)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------
# the papers' hyperparameters
# --------------------------------------------------------------------------------------------------------------
# Keys: dataset, model (the MODEL_NAMES entry), optimizer ("adam" | "sgd"), lr, momentum, batch_size, iterations,
# milestones (iterations at which lr *= gamma), gamma, warmup (iterations of linear lr warmup from 0), weight_decay,
# dropout, prune_fc / prune_conv / prune_output (fraction of the surviving weights of that layer type pruned per
# round; the output layer uses prune_output), prune_global (True: one magnitude threshold across all layers of a
# type; False: layer-wise).
#
# Sources: "LTH" = Frankle & Carbin, ICLR 2019, Figure 2's table (see /work/shared/PAPERS.md);
# "open_lth" = facebookresearch/open_lth default_hparams (models/cifar_resnet.py, models/cifar_vgg.py).
def _hp(**kw) -> dict:
    base = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "batch_size": 60,
            "iterations": 0, "milestones": [], "gamma": 0.1, "warmup": 0, "weight_decay": 0.0, "dropout": 0.0,
            "prune_fc": 0.0, "prune_conv": 0.0, "prune_output": 0.0, "prune_global": False}
    unknown = set(kw) - set(base) - {"model"}
    assert not unknown, unknown
    base.update(kw)
    return base


# VGG-19 on CIFAR-10 at batch 64: the paper decays at epochs 80 and 120. One epoch = ceil(50,000 / 64) = 782
# iterations (the last, partial batch of each epoch counted, as in the paper's / a PyTorch DataLoader's epochs),
# so the milestones are 80 * 782 = 62,560 and 120 * 782 = 93,840. (DeviceDataset.batch streams epochs without a
# partial batch, 781.25 iterations per epoch, so these fall at epochs 80.08 and 120.12 there.)
_VGG_EPOCH_ITERS = math.ceil(50_000 / 64)  # 782
_VGG_MILESTONES = [80 * _VGG_EPOCH_ITERS, 120 * _VGG_EPOCH_ITERS]  # [62560, 93840]

PAPER_HPARAMS: dict[str, dict] = {
    # LTH: Adam 1.2e-3, batch 60, 50K iterations, fc 20%, output 10% (half rate), layer-wise. No weight decay.
    "lenet300_100": _hp(model="lenet300_100", dataset="mnist", optimizer="adam", lr=1.2e-3, batch_size=60,
                        iterations=50_000, prune_fc=0.2, prune_output=0.1),
    # LTH: Adam 2e-4, batch 60, 20K iterations, conv 10%, fc 20%, output 10%, layer-wise.
    "conv2": _hp(model="conv2", optimizer="adam", lr=2e-4, batch_size=60, iterations=20_000,
                 prune_conv=0.1, prune_fc=0.2, prune_output=0.1),
    # LTH: Adam 3e-4, batch 60, 25K iterations, conv 10%, fc 20%, output 10%, layer-wise.
    "conv4": _hp(model="conv4", optimizer="adam", lr=3e-4, batch_size=60, iterations=25_000,
                 prune_conv=0.1, prune_fc=0.2, prune_output=0.1),
    # LTH: Adam 3e-4, batch 60, 30K iterations, conv 15%, fc 20%, output 10%, layer-wise.
    "conv6": _hp(model="conv6", optimizer="adam", lr=3e-4, batch_size=60, iterations=30_000,
                 prune_conv=0.15, prune_fc=0.2, prune_output=0.1),
    # LTH: SGD momentum 0.9, lr 0.1, /10 at 20K and 25K, 30K iterations, batch 128, conv 20%, fc 0%, global.
    # weight_decay 1e-4: open_lth's cifar_resnet default.
    "resnet20": _hp(model="resnet20", momentum=0.9, lr=0.1, batch_size=128, iterations=30_000,
                    milestones=[20_000, 25_000], weight_decay=1e-4, prune_conv=0.2, prune_global=True),
    # LTH: SGD momentum 0.9, lr 0.1, /10 at epochs 80 and 120 (iterations 62,560 and 93,840, see above),
    # 112K iterations, batch 64, conv 20%, fc 0%, global. weight_decay 1e-4: open_lth's cifar_vgg default.
    "vgg19": _hp(model="vgg19", momentum=0.9, lr=0.1, batch_size=64, iterations=112_000,
                 milestones=list(_VGG_MILESTONES), weight_decay=1e-4, prune_conv=0.2, prune_global=True),
}
# VGG-11/13/16: not in the LTH paper's table; the VGG-19 settings (the Stabilizing/LMC papers use VGG-16 with the
# same optimizer family).
for _n in ("vgg11", "vgg13", "vgg16"):
    PAPER_HPARAMS[_n] = {**copy.deepcopy(PAPER_HPARAMS["vgg19"]), "model": _n}
# ResNet-18 (CIFAR): not in the table (the paper's "ResNet-18" is ResNet-20); the ResNet-20 settings.
PAPER_HPARAMS["resnet18"] = {**copy.deepcopy(PAPER_HPARAMS["resnet20"]), "model": "resnet18"}
# LTH, deep networks: at lr 0.1 IMP finds no tickets; it does with linear warmup (ResNet-20: lr 0.03 warmed up
# over 20K iterations; VGG-19: lr 0.1 over 10K) or with a low learning rate (0.01).
PAPER_HPARAMS["resnet20_warmup"] = {**copy.deepcopy(PAPER_HPARAMS["resnet20"]), "lr": 0.03, "warmup": 20_000}
PAPER_HPARAMS["vgg19_warmup"] = {**copy.deepcopy(PAPER_HPARAMS["vgg19"]), "lr": 0.1, "warmup": 10_000}
PAPER_HPARAMS["resnet20_lowlr"] = {**copy.deepcopy(PAPER_HPARAMS["resnet20"]), "lr": 0.01}
PAPER_HPARAMS["vgg19_lowlr"] = {**copy.deepcopy(PAPER_HPARAMS["vgg19"]), "lr": 0.01}
del _n


def paper_hparams(name: str) -> dict:
    """A deep copy of ``PAPER_HPARAMS[name]`` (safe to modify); ValueError for an unknown name."""
    if name not in PAPER_HPARAMS:
        raise ValueError(f"no paper hyperparameters for {name!r}; known: {', '.join(PAPER_HPARAMS)}")
    return copy.deepcopy(PAPER_HPARAMS[name])

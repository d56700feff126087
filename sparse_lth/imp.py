"""Iterative magnitude pruning (IMP) with rewinding, and the lottery-ticket paper's controls, as one driver.

``run_imp(hparams, run_root="runs")`` runs rounds 0..``hparams.rounds`` for each replicate seed:

- round 0 trains the dense network from its initialization θ0 (saved) and captures the rewind point θk;
- round r > 0 prunes ``prune_*`` of the weights that SURVIVED round r-1 (smallest magnitudes of round r-1's
  trained weights; layer-wise, or global within each layer type), rewinds the survivors to θk and trains for
  iterations [k, iterations) with a fresh optimizer.

``hparams.control`` selects a mode of the same driver:

- ``imp``: the above.
- ``reinit``: random reinitialization: round r uses the masks of the matching ``imp`` experiment's round r (same
  hyperparameters, same seed, same run root) with fresh random weights.
- ``random_prune``: random masks with the ticket's per-layer sparsity (read from the ``imp`` experiment when it
  exists; computed by the layer-wise rule otherwise), weights rewound to θk as in IMP.
- ``oneshot``: a single pruning round straight to the target: ``oneshot_remaining`` (fraction of each pruned
  layer's weights kept, or of the pooled weights with global pruning) or, when unset, exactly the live counts
  that ``rounds`` iterative rounds reach. With ``oneshot_levels``, one round per level instead: round r prunes
  the dense network's trained weights (round 0) at once to the live counts of IMP's round r, so that one
  experiment gives the one-shot curve to set beside IMP's (the paper's comparison of the two).
- ``continue``: prune as IMP but keep training the trained weights, without resetting them, each round.
- ``noise``: the ticket's masks (as ``reinit`` takes them) and its starting weights θk plus Gaussian noise of
  ``noise_std`` times the standard deviation of each layer's θ0 (the paper's test of how much a ticket depends on
  its exact initial values), drawn anew for every round.

A control's round 0 (the dense network) is the ``imp`` experiment's: when that has finished round 0 for the seed
from the same θ0, the control takes its masks, final weights, rewind point and metrics (``reused_from`` in its
metrics) instead of training the same network again; ``reuse_dense_round=False`` trains it anyway. A control
started beside its IMP run with ``wait_for_source`` waits for that round (up to that many seconds) rather than
training it a second time. An IMP run given another IMP run as ``source_dir`` takes its round 0 the same way,
when the two differ only in how they prune (:data:`PRUNING_SETTINGS`: pruning rates, rounds, global pruning,
layers left dense): the variants of a pruning ablation then start from one and the same dense network.

Run folders: ``<run_root>/<model>_<control>_<hash>/`` where the hash covers the hyperparameters that differ from
:class:`ImpHparams`' defaults (except ``seed``), so the same experiment finds the same folder. It holds
``hparams.json`` and one ``seed_<s>/`` per replicate with ``init.pt`` (θ0), ``rewind.pt`` (θk) and per round
``round_<r>/masks.pt``, ``checkpoint.pt`` (while the round runs), ``final.pt`` (trained weights) and
``metrics.json`` (written last: a round that has it is skipped on re-run). A killed run resumes from its last
checkpoint and ends, on CPU, with exactly the masks and metrics of an uninterrupted run (wall times excepted),
as long as it resumes under the same numerics (torch version, device, CPU instruction set, threads: each round's
``metrics.json`` records them under ``environments``, and a round or resume under others warns; see
:mod:`sparse_lth.environment`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import runlock
from ._files import TEMPORARY, canonical_hparams, copy_atomic, read_json, write_atomic
from .environment import environment, warn_if_changed
from .train import OPTIMIZERS, TrainConfig, _is_int_in, save_atomic, train

CONTROLS = ("imp", "reinit", "random_prune", "oneshot", "continue", "noise")
SOURCE_MASK_CONTROLS = ("reinit", "noise")  # controls that train the imp experiment's masks
# the hyperparameters that only a control uses: its IMP run (the source) has them at their defaults
CONTROL_SETTINGS = ("oneshot_remaining", "oneshot_levels", "noise_std")
# the hyperparameters that say how an experiment prunes, not how it trains the dense network: an IMP run may take
# its round 0 from another IMP run (source_dir) that differs from it only in these
PRUNING_SETTINGS = ("rounds", "prune_fc", "prune_conv", "prune_output", "prune_global", "prune_score",
                    "dense_layers")
#: What decides which surviving weights a round prunes (the lowest scores go): ``w`` the trained weight, ``w0`` the
#: weight at the rewind point. IMP's own is the magnitude; Zhou et al. ("Deconstructing lottery tickets", 2019)
#: compare criteria of the other kind.
PRUNE_SCORES = {
    "magnitude": lambda w, w0: w.abs(),
    "movement": lambda w, w0: (w - w0).abs(),                # how far a weight moved from the rewind point
    "magnitude_increase": lambda w, w0: w.abs() - w0.abs(),  # how much its magnitude grew
}
LAYER_IMPLS = ("sparse", "masked")
PATHS = ("auto", "dense", "sparse")


@dataclass
class ImpHparams:
    """Everything that defines an IMP experiment (defaults: LeNet-300-100 on MNIST as in the paper)."""

    # model and data
    model: str = "lenet300_100"     # a built-in network, or your own as "package.module:callable"
    dataset: str = ""               # "" = the model's dataset
    width: float = 1.0
    dropout: float = 0.0
    augment: str = "auto"           # auto (the dataset's default) | on | off
    data_limit: int = 0             # use only the first N training examples (0: all)
    test_limit: int = 0             # use only the first N test examples (0: all)
    val_split: int = 0              # early-stop on the loss of N held-out training images (paper: 5000); 0: test loss
    # training, per round
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 60
    iterations: str = "50000it"     # training budget per round: "Nit" (iterations) or "Nep" (epochs)
    milestones: tuple[int, ...] = ()  # lr multiplied by gamma at these iterations
    gamma: float = 0.1
    warmup: int = 0                 # linear lr warmup, iterations
    eval_every: int = 500
    train_eval_size: int = 1000
    optimizer_impl: str = "torch"   # torch | sparse_lth (sparse_lth.optim; faster with Adam on a CPU: README)
    precision: str = "fp32"         # fp32 | bf16: forward passes under bf16 autocast (weights, optimizer in fp32)
    # pruning
    rounds: int = 15                # pruning rounds after the dense round 0
    prune_fc: float = 0.2           # fraction of the SURVIVING weights pruned per round, per layer type
    prune_conv: float = 0.1
    prune_output: float = 0.1      # the output layer, at its own rate (the paper: half the fc rate)
    prune_global: bool = False      # global magnitude pruning (within each layer type) instead of layer-wise
    prune_score: str = "magnitude"  # magnitude | movement | magnitude_increase (these two: vs the rewind point)
    dense_layers: tuple[str, ...] = ()  # module names left dense
    rewind: str = "0it"             # rewind point: "Nit" or "Nep"; 0 = the original initialization
    control: str = "imp"            # imp | reinit | random_prune | oneshot | continue | noise
    oneshot_remaining: float = 0.0  # oneshot: fraction of weights kept (0: what `rounds` rounds of IMP keep)
    oneshot_levels: bool = False    # oneshot: round r prunes the dense network at once to IMP round r's sparsity
    noise_std: float = 0.0          # noise: Gaussian noise on the ticket's starting weights, in units of each layer's θ0 std
    reuse_dense_round: bool = True  # controls (and IMP given a source): take round 0 from the source run
    # layers
    layer_impl: str = "sparse"      # sparse (sparse_lth.layers) | masked (plain layers, dense masking)
    path: str = "auto"              # auto | dense | sparse: the sparse layers' path
    ops: str = "auto"               # the sparse path's ops: auto | sparse | dense | op=impl,... (sparse_lth.layers)
    timed_paths: bool = False       # choose "auto" paths by timing on any device (CUDA always times), optimizer too
    backend: str = "auto"           # auto | torch | triton | interpret
    # replicate
    seed: int = 0                   # model init and data order; not part of the experiment's hash

    def __post_init__(self):
        self.milestones = tuple(int(m) for m in self.milestones)
        self.dense_layers = tuple(str(d) for d in self.dense_layers)


# Hyperparameters that do not change the experiment's identity (replicates live in the same experiment; a reused
# dense round is the one the control would train, bit for bit where training is deterministic).
NOT_HASHED = ("seed", "reuse_dense_round")


def hparams_dict(hp: ImpHparams) -> dict:
    d = dataclasses.asdict(hp)
    d["milestones"] = list(d["milestones"])
    d["dense_layers"] = list(d["dense_layers"])
    return d


def non_default(hp: ImpHparams) -> dict:
    """The hyperparameters that differ from :class:`ImpHparams`' defaults (those that name the experiment), with
    their step counts in one spelling (before, "3000" and "3000it" named two experiments)."""
    ref = canonical_hparams(hparams_dict(ImpHparams()))
    return {k: v for k, v in canonical_hparams(hparams_dict(hp)).items() if k not in NOT_HASHED and v != ref[k]}


def experiment_name(hp: ImpHparams) -> str:
    """``<model>_<control>_<hash of the non-default hyperparameters>``."""
    blob = json.dumps(non_default(hp), sort_keys=True)
    return f"{_folder_safe(hp.model)}_{hp.control}_{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def run_dataset(model: str, dataset: str = "") -> str:
    """The dataset an IMP run of ``model`` trains on: ``dataset`` if given, else the model's preset's, else the one
    the model was made for (ValueError for a model of one's own, which has none)."""
    if dataset:
        return dataset
    from . import models
    return models.PAPER_HPARAMS.get(model, {}).get("dataset") or models.default_dataset(model)


def _folder_safe(model: str) -> str:
    """The model's name as a folder name's part ("torchvision.models:resnet18" -> "torchvision.models-resnet18")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model)


def _default_dir(run_root: str, hp: ImpHparams) -> str:
    """``<run_root>/<experiment_name>``, or, when only that exists, a folder an older version named from a step
    count spelled otherwise ("3000" for "3000it"), so that it is resumed rather than started again."""
    path = os.path.join(run_root, experiment_name(hp))
    if os.path.isdir(path) or not os.path.isdir(run_root):
        return path
    mine = {k: v for k, v in canonical_hparams(hparams_dict(hp)).items() if k not in NOT_HASHED}
    defaults = hparams_dict(ImpHparams())
    pattern = os.path.join(run_root, f"{_folder_safe(hp.model)}_{hp.control}_*", "hparams.json")
    for cand in sorted(glob.glob(pattern)):
        try:
            old = canonical_hparams({**defaults, **read_json(cand)})
        except (OSError, ValueError):
            continue
        if {k: v for k, v in old.items() if k not in NOT_HASHED} == mine:
            return os.path.dirname(cand)
    return path


def hparams_from_dict(d: dict) -> ImpHparams:
    names = {f.name for f in dataclasses.fields(ImpHparams)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}")
    return ImpHparams(**d)


# ------------------------------------------------------------------------------------------------ step counts
def parse_steps(value, iterations_per_epoch: int, what: str) -> int:
    """``"500it"`` -> 500, ``"2ep"`` -> 2 * iterations_per_epoch, ``500``/``"500"`` -> 500."""
    s = str(value).strip().lower()
    try:
        if s.endswith("ep"):
            return int(round(float(s[:-2]) * iterations_per_epoch))
        if s.endswith("it"):
            s = s[:-2]
        n = float(s)
        if n != int(n):
            raise ValueError
        return int(n)
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e400it"
        raise ValueError(f"{what} must look like '500it', '2ep' or 500; got {value!r}") from None


# -------------------------------------------------------------------------------------------- masks and layers
def _candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sparse layers and plain Linear/Conv2d, but not a layer whose weight is reparametrized (weight_norm,
    spectral_norm, torch.nn.utils.parametrize): its weight is computed again at every forward, so a mask on it
    does not hold (and the rewind point holds no ``<layer>.weight``). ``sparsify`` leaves those plain, and IMP
    leaves them dense (:func:`reparametrized_layers` names them)."""
    from .layers import _reparametrized
    return [(n, m) for n, m in model.named_modules()
            if ((hasattr(m, "set_mask") and hasattr(m, "mask")) or isinstance(m, (nn.Linear, nn.Conv2d)))
            and not _reparametrized(m)]


def reparametrized_layers(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the Linear/Conv2d layers that pruning leaves dense because their weight is
    reparametrized (see :func:`_candidate_layers`)."""
    from .layers import _reparametrized
    return {n: why for n, m in model.named_modules() if (why := _reparametrized(m))}


def warn_reparametrized(model: nn.Module) -> None:
    """One warning naming the layers that pruning leaves dense because their weight is reparametrized."""
    left = reparametrized_layers(model)
    if left:
        import warnings
        warnings.warn("not pruned (kept dense): " + "; ".join(f"{n}: {why}" for n, why in left.items())
                      + ". A mask would not hold on a weight computed at every forward; remove the "
                      "reparametrization (torch.nn.utils.parametrize.remove_parametrizations, "
                      "remove_weight_norm, remove_spectral_norm) to prune it", UserWarning, stacklevel=3)


def _tied_to(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every plain layer whose weight is the very parameter of a layer before it (tied
    weights): one weight, pruned once, under the first layer's name."""
    first: dict[int, str] = {}
    out = {}
    for n, m in _candidate_layers(model):
        w = m.__dict__.get("_parameters", {}).get("weight")
        if w is None:
            continue
        if id(w) in first:
            out[n] = first[id(w)]
        else:
            first[id(w)] = n
    return out


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers IMP can prune: sparse layers, or plain ``nn.Linear``/``nn.Conv2d`` (in module order). A layer
    whose weight is tied to an earlier layer's (the same parameter) is not listed again: the weight is pruned
    once, as the first layer's, and the other layer computes with it masked."""
    tied = _tied_to(model)
    return [(n, m) for n, m in _candidate_layers(model) if n not in tied]


def output_layer_name(model: nn.Module) -> str | None:
    """The layer pruned at the output rate: the model's ``output_layer`` attribute, else its last Linear; a layer
    tied to an earlier one is named by that one. None for an all-convolutional model (a 1x1-conv classifier, as
    NiN or SqueezeNet) without the attribute: every layer is then pruned at the conv rate."""
    inner, prefix = _unwrapped(model)
    if inner is not model:  # the names of a wrapped model's layers carry the wrapper's prefix
        name = output_layer_name(inner)
        return None if name is None else prefix + name
    name = getattr(model, "output_layer", None)
    candidates = _candidate_layers(model)
    if not isinstance(name, str):  # the last Linear (a model of one's own may hold a module by that name); one
        # kept dense as reparametrized is still the output layer: no other layer takes its rate
        names = {c for c, _ in candidates}
        lin = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) or (n in names and _is_linear(m))]
        if not lin:
            return None
        name = lin[-1]
    elif name not in {n for n, _ in candidates} and name not in reparametrized_layers(model):
        # a typo gave no layer the output rate, silently (a reparametrized layer is kept dense: named, it is
        # still the output layer, and no other layer takes its rate)
        raise ValueError(f"the model's output_layer {name!r} is not one of its prunable layers "
                         f"{[n for n, _ in candidates]}")
    return _tied_to(model).get(name, name)


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """(the model inside DataParallel / DistributedDataParallel / torch.compile's wrapper, the prefix its layers'
    names get in the wrapper), or (model, "")."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _is_linear(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return False
    w = dense_weight(m)
    return w.dim() == 2


def layer_kind(name: str, m: nn.Module, output_name: str | None) -> str:
    if name == output_name:
        return "output"
    return "fc" if _is_linear(m) else "conv"


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """``{layer name: "conv" | "fc" | "output"}`` for the prunable layers of ``model`` (the kinds that IMP prunes
    at their own rates)."""
    out_name = output_layer_name(model)
    return {n: layer_kind(n, m, out_name) for n, m in prunable_layers(model)}


def dense_weight(m: nn.Module) -> torch.Tensor:
    """The layer's dense weight (zeros at pruned positions)."""
    if hasattr(m, "dense_weight"):
        return m.dense_weight().detach()
    return m.weight.detach()


def get_mask(m: nn.Module) -> torch.Tensor:
    if hasattr(m, "set_mask"):
        return m.mask.detach().clone().bool()
    mk = getattr(m, "weight_mask", None)
    if isinstance(mk, torch.Tensor):
        return mk.detach().clone().bool()
    return torch.ones_like(m.weight, dtype=torch.bool)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: get_mask(m) for n, m in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], path: str | None = None) -> None:
    """Set every prunable layer's mask: ``set_mask`` on sparse layers (``path``: auto/dense/sparse); a bool
    ``weight_mask`` buffer on plain layers (the training loop keeps them masked). Pruned weights become 0."""
    layers = dict(prunable_layers(model))
    missing = set(layers) - set(masks)
    extra = set(masks) - set(layers)
    if missing or extra:
        raise ValueError(f"masks do not match the model's layers (missing {sorted(missing)}, "
                         f"unknown {sorted(extra)})")
    for name, m in layers.items():
        mask = masks[name]
        w = dense_weight(m)
        if mask.shape != w.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask for {name} must be bool, got {mask.dtype}")
        mask = mask.to(w.device)
        if hasattr(m, "set_mask"):
            m.set_mask(mask, path=None if path in (None, "auto") else path)
        else:
            if isinstance(getattr(m, "weight_mask", None), torch.Tensor):
                m.weight_mask = mask.clone()
            else:
                m.register_buffer("weight_mask", mask.clone())
            with torch.no_grad():
                m.weight.mul_(mask)


def layer_rates(kinds: dict[str, str], *, fc: float, conv: float, output: float,
                dense_layers=()) -> dict[str, float]:
    """``{layer: fraction of its surviving weights pruned per round}`` from each layer's kind (``kinds``, as
    :func:`layer_kinds` gives) and the rate of each kind; the layers in ``dense_layers`` get 0."""
    by_kind = {"fc": fc, "conv": conv, "output": output}
    return {n: 0.0 if n in dense_layers else by_kind[k] for n, k in kinds.items()}


def global_groups(kinds: dict[str, str], rates: dict[str, float]) -> list[list[str]]:
    """The pools of global pruning: the pruned layers of each kind together (conv, fc and the output layer are
    pruned at their own rates, so each kind is its own pool)."""
    groups: dict[str, list[str]] = {}
    for n, k in kinds.items():
        if rates[n] > 0:
            groups.setdefault(k, []).append(n)
    return list(groups.values())


def count_masks(masks: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {n: (int(mk.sum().item()), mk.numel()) for n, mk in masks.items()}


def live_and_total(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(live weights, all weights) over every layer of ``masks``."""
    counts = count_masks(masks).values()
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _n_prune(fraction: float, live: int) -> int:
    return min(live, int(math.floor(fraction * live + 0.5)))


def _oneshot_fractions(shapes: dict[str, tuple[int, ...]], rates: dict[str, float],
                       groups: list[list[str]] | None, rounds: int) -> dict[str, float]:
    """The fraction of each dense layer to prune at once so that exactly as many weights survive as ``rounds``
    iterative rounds at ``rates`` leave (per layer, or per pool of ``groups`` with global pruning)."""
    rows = pruning_schedule(shapes, rates, groups, rounds)
    first, last = rows[0], rows[-1]
    return {n: (first[g] - last[g]) / first[g] if first[g] else 0.0 for g in first for n in g}


def pruning_schedule(shapes: dict[str, tuple[int, ...]], rates: dict[str, float],
                     groups: list[list[str]] | None, rounds: int) -> list[dict[tuple[str, ...], int]]:
    """The live weights of each pool after rounds 0..``rounds`` of IMP at ``rates``, known without training:
    every round prunes a fixed share of each pool's survivors. A pool is one layer, or one of ``groups`` with
    global pruning (where a single layer's count depends on the weights, the pool's does not)."""
    pools = [tuple(g) for g in (groups or []) if g]
    pooled = {n for g in pools for n in g}
    pools += [(n,) for n in shapes if n not in pooled]
    live = {g: sum(math.prod(shapes[n]) for n in g) for g in pools}
    rows = [dict(live)]
    for _ in range(rounds):
        live = {g: v - _n_prune(rates[g[0]], v) for g, v in live.items()}
        rows.append(dict(live))
    return rows


def magnitude_prune(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                    fractions: dict[str, float], global_groups: list[list[str]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """New masks: prune ``fractions[name]`` of each layer's SURVIVING weights with the smallest magnitudes.

    ``global_groups``: lists of layer names pooled together (their fractions must agree); the smallest
    ``fraction`` of the pool's surviving weights go, wherever they are. Layers not in a group are pruned
    layer-wise. Ties go to the lower index (stable sort), so the result is deterministic.
    """
    return prune_by_score(weight_scores("magnitude", weights), masks, fractions, global_groups)


def weight_scores(score: str, weights: dict[str, torch.Tensor], starts: dict | None = None
                  ) -> dict[str, torch.Tensor]:
    """``{layer: PRUNE_SCORES[score](w, w0)}`` in fp32 for each layer's weight ``w``; ``starts``: the state at the
    rewind point (``"<layer>.weight"`` keys), which every score but "magnitude" needs."""
    if score != "magnitude" and starts is None:
        raise RuntimeError(f"score {score!r} compares the weights with the rewind point, which is not given")
    fn = PRUNE_SCORES[score]
    return {n: fn(w.detach().float(), None if starts is None else starts[f"{n}.weight"].to(w.device).float())
            for n, w in weights.items()}


def prune_by_score(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   fractions: dict[str, float], global_groups: list[list[str]] | None = None
                   ) -> dict[str, torch.Tensor]:
    """:func:`magnitude_prune` with any score in place of the magnitude: prune ``fractions[name]`` of each
    layer's (or pool's) surviving weights with the lowest ``scores`` (of the weights' shapes; any sign)."""
    new = {n: mk.clone() for n, mk in masks.items()}
    groups = [list(g) for g in (global_groups or []) if g]
    grouped = {n for g in groups for n in g}
    groups += [[n] for n in masks if n not in grouped]
    for g in groups:
        f = {fractions.get(n, 0.0) for n in g}
        if len(f) != 1:
            raise ValueError(f"layers {g} are pooled for global pruning but have different fractions {f}")
        f = f.pop()
        if f <= 0:
            continue
        mags = torch.cat([scores[n].detach().reshape(-1).float().cpu()[masks[n].reshape(-1).cpu()]
                          for n in g])
        k = _n_prune(f, mags.numel())
        if k == 0:
            continue
        order = torch.sort(mags, stable=True).indices[:k]
        drop = torch.zeros(mags.numel(), dtype=torch.bool)
        drop[order] = True
        off = 0
        for n in g:
            flat = new[n].reshape(-1).cpu().clone()
            live_idx = flat.nonzero().reshape(-1)
            d = drop[off:off + live_idx.numel()]
            off += live_idx.numel()
            flat[live_idx[d]] = False
            new[n] = flat.reshape(masks[n].shape).to(masks[n].device)
    return new


def random_masks(shapes: dict[str, tuple[int, ...]], keep: dict[str, int], generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Uniformly random bool masks with exactly ``keep[name]`` live weights each."""
    out = {}
    for n, shape in shapes.items():
        numel = math.prod(shape)
        if not 0 <= keep[n] <= numel:
            raise ValueError(f"cannot keep {keep[n]} of {numel} weights in {n}")
        idx = torch.randperm(numel, generator=generator)[:keep[n]]
        mk = torch.zeros(numel, dtype=torch.bool)
        mk[idx] = True
        out[n] = mk.reshape(shape)
    return out


# -------------------------------------------------------------------------------------------------- the driver
@dataclass
class ImpResult:
    experiment_dir: str
    hparams: ImpHparams
    metrics: dict[int, list[dict]] = field(default_factory=dict)  # seed -> per-round metrics


class SourceNotReady(FileNotFoundError):
    """A control's IMP run has not (yet) written what the control needs from it: its masks of round 1."""


def _hparams_differ(path: str, hp: ImpHparams) -> list[str]:
    """The hyperparameters in which the experiment folder's ``hparams.json`` at ``path`` differs from ``hp`` (those
    that name an experiment; canonical, so "20" and "20it" are one budget)."""
    mine = {k: v for k, v in canonical_hparams(hparams_dict(hp)).items() if k not in NOT_HASHED}
    # a hyperparameter added since the folder was written had its default there (the hash skips defaults)
    old = canonical_hparams({**hparams_dict(ImpHparams()), **read_json(path)})
    old = {k: v for k, v in old.items() if k not in NOT_HASHED}
    return sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))


class Experiment:
    """One IMP experiment (a set of hyperparameters) in its run folder; ``run_seed(seed)`` runs a replicate."""

    def __init__(self, hparams: ImpHparams, run_root: str = "runs", *, device: str | torch.device = "cpu",
                 data_root: str | None = None, progress: bool = True, checkpoint_every: int = 1000,
                 run_dir: str | None = None, wait_for_source: float = 0.0, data=None, source_dir: str | None = None,
                 cuda_graph: bool = False):
        self.hp = hparams
        # how the rounds execute, not what they compute (not a hyperparameter: see TrainConfig.cuda_graph)
        self.cuda_graph = bool(cuda_graph)
        # controls: the IMP run's folder (default: <run_root>/<its name>); IMP: a run to take round 0 from
        self.source_dir = source_dir
        self.run_root = str(run_root)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches on the current device (paths are timed before train)
        self.data_root = data_root
        self.progress = progress
        self.checkpoint_every = int(checkpoint_every)
        self.wait_for_source = float(wait_for_source)
        self.dir = run_dir or _default_dir(self.run_root, hparams)
        self._data = None
        self._val = None
        self._raw = None  # (train, test) before the validation split
        if data is not None:  # (train, test) DeviceDatasets given by the caller instead of hparams.dataset
            tr, te = data
            self._raw = (tr.to(self.device), te.to(self.device))
        self._validate()

    # ------------------------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Refuse bad hyperparameters before anything is trained or written."""
        hp = self.hp
        if not _is_int_in(hp.seed, SEED_LIMIT):
            # (the seeds derived from it, such as a reinit control's 1_000_003 * (seed + 1) + ..., must fit in 64
            # bits: torch's generators refused them with "Overflow when unpacking long long")
            raise ValueError(f"seed must be an integer in [-2**40, 2**40), got {hp.seed!r}")
        from . import models
        if models.is_import_path(hp.model):
            models.import_model_fn(hp.model)  # importable, callable
            if not hp.dataset:
                models.default_dataset(hp.model)  # raises: a model of one's own needs its dataset named
        elif hp.model not in models.MODEL_NAMES:
            raise ValueError(f"unknown model {hp.model!r}; choose one of {sorted(models.MODEL_NAMES)}, or a model "
                             "of your own as 'package.module:callable'")
        if self._raw is None:  # loaded by name (not given by the caller): a known dataset, refused before --plan
            from .data import DATASETS
            if self.dataset not in DATASETS:
                raise ValueError(f"unknown dataset {self.dataset!r}; known datasets: {', '.join(DATASETS)}")
        if hp.control not in CONTROLS:
            raise ValueError(f"unknown control {hp.control!r}; choose one of {CONTROLS}")
        if hp.layer_impl not in LAYER_IMPLS:
            raise ValueError(f"unknown layer_impl {hp.layer_impl!r}; choose one of {LAYER_IMPLS}")
        if hp.path not in PATHS:
            raise ValueError(f"unknown path {hp.path!r}; choose one of {PATHS}")
        from .layers import parse_ops
        parse_ops(hp.ops)
        if hp.augment not in ("auto", "on", "off"):
            raise ValueError(f"augment must be auto, on or off; got {hp.augment!r}")
        for name in ("prune_fc", "prune_conv", "prune_output"):
            v = getattr(hp, name)
            if not (0.0 <= v < 1.0) or (v != 0.0 and not 0.0 < v < 1.0):
                raise ValueError(f"{name}={v}: a pruning fraction must lie in (0, 1) (or be 0: never pruned)")
        if hp.prune_score not in PRUNE_SCORES:
            raise ValueError(f"unknown prune_score {hp.prune_score!r}; choose one of {tuple(PRUNE_SCORES)}")
        if hp.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {hp.rounds}")
        if hp.control == "oneshot" and hp.oneshot_remaining and not 0.0 < hp.oneshot_remaining < 1.0:
            raise ValueError(f"oneshot_remaining={hp.oneshot_remaining} must lie in (0, 1)")
        if hp.oneshot_remaining and hp.control != "oneshot":
            raise ValueError("oneshot_remaining is only used with control 'oneshot'")
        if hp.oneshot_levels and hp.control != "oneshot":
            raise ValueError("oneshot_levels is only used with control 'oneshot'")
        if hp.oneshot_levels and hp.oneshot_remaining:
            raise ValueError("oneshot_levels prunes to the sparsity of each IMP round: it takes no "
                             "oneshot_remaining")
        if hp.control == "oneshot" and not hp.oneshot_remaining and hp.rounds == 0:
            raise ValueError("oneshot prunes at once to what `rounds` rounds of IMP keep (oneshot_levels: to each "
                             "of those levels): with rounds=0 it would prune nothing and train the dense network "
                             "again; give rounds > 0 or oneshot_remaining")
        if hp.control == "noise" and not (hp.noise_std > 0 and math.isfinite(hp.noise_std)):
            raise ValueError(f"control 'noise' needs noise_std > 0 (in units of each layer's initial std), "
                             f"got {hp.noise_std}")
        if hp.noise_std and hp.control != "noise":
            raise ValueError("noise_std is only used with control 'noise'")
        if hp.data_limit < 0 or hp.test_limit < 0:
            raise ValueError("data_limit and test_limit must be >= 0")
        if isinstance(hp.val_split, bool) or not isinstance(hp.val_split, int) or hp.val_split < 0:
            raise ValueError(f"val_split must be an integer >= 0 (0: no validation set), got {hp.val_split!r}")
        if hp.val_split:  # at least one example must stay for training: known without reading the files
            from .data import TRAIN_SIZES
            sizes = [len(self._raw[0])] if self._raw is not None else \
                [n for n in (hp.data_limit, TRAIN_SIZES.get(self.dataset)) if n]
            if sizes and hp.val_split >= min(sizes):
                raise ValueError(f"val_split={hp.val_split}: cannot hold out {hp.val_split} of {min(sizes)} training "
                                 "examples" + (" (data_limit)" if self._raw is None and min(sizes) == hp.data_limit
                                               else "") + ": at least one must stay for training")
        # training config (optimizer, lr, ...) is checked by TrainConfig; steps need the dataset size
        n_train = self._n_train()
        ipe = math.ceil(n_train / hp.batch_size) if hp.batch_size > 0 else 1
        self.iterations = parse_steps(hp.iterations, ipe, "iterations")
        self.rewind_iteration = parse_steps(hp.rewind, ipe, "rewind")
        self.train_cfg = self._train_config()
        if not 0 <= self.rewind_iteration < self.iterations:
            raise ValueError(f"rewind point {hp.rewind!r} = iteration {self.rewind_iteration} is not before the "
                             f"end of training ({self.iterations} iterations)")
        model = self._build_model(self.hp.seed, sparse=False)
        layers = dict(prunable_layers(model))
        warn_reparametrized(model)
        bad = [d for d in hp.dense_layers if d not in layers]
        if bad:
            raise ValueError(f"dense_layers {bad} are not prunable layers of {hp.model}; "
                             f"those are {list(layers)}")
        rates = self._rates(model)
        if hp.rounds > 0 and hp.control not in SOURCE_MASK_CONTROLS and not any(r > 0 for r in rates.values()):
            raise ValueError("no layer would be pruned: all pruning fractions are 0 or the layers are dense_layers")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if hp.layer_impl == "sparse":
            from .backend import resolve_backend
            try:
                resolve_backend(self.device, None if hp.backend == "auto" else hp.backend)
            except RuntimeError as e:
                raise ValueError(str(e)) from None
        # the run folder: refuse one that holds another experiment, or something that is not an experiment
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise ValueError(f"run folder {self.dir} is a file, not a folder")
        existing = os.path.join(self.dir, "hparams.json")
        # (a hparams.json.tmp<pid> is one being written, or left by a kill while it was)
        if os.path.isdir(self.dir) and not os.path.exists(existing) and \
                [f for f in os.listdir(self.dir) if not f.startswith("hparams.json.tmp")]:
            raise ValueError(f"run folder {self.dir} is not empty and holds no experiment (no hparams.json): give "
                             "an experiment folder `sparse-lth imp` made, or a new or empty one (a run root such as "
                             "runs/ is given with --runs)")
        if os.path.exists(existing):
            diff = _hparams_differ(existing, hp)
            if diff:
                raise ValueError(f"run folder {self.dir} holds another experiment (hyperparameters differ in "
                                 f"{diff}); choose another folder")

    def _n_train(self) -> int:
        if "ep" not in str(self.hp.iterations).lower() and "ep" not in str(self.hp.rewind).lower():
            return 1
        return len(self.data[0])

    def _train_config(self) -> TrainConfig:
        hp = self.hp
        if hp.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {hp.optimizer!r}; choose one of {OPTIMIZERS}")
        return TrainConfig(optimizer=hp.optimizer, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                           weight_decay=hp.weight_decay, batch_size=hp.batch_size, iterations=self.iterations,
                           milestones=hp.milestones, gamma=hp.gamma, warmup=hp.warmup, eval_every=hp.eval_every,
                           train_eval_size=hp.train_eval_size, seed=hp.seed, progress=self.progress,
                           optimizer_impl=hp.optimizer_impl, precision=hp.precision, cuda_graph=self.cuda_graph)

    # ------------------------------------------------------------------------------------ pieces
    @property
    def dataset(self) -> str:
        return run_dataset(self.hp.model, self.hp.dataset)

    @property
    def data(self):
        """(train, test) DeviceDatasets; with ``val_split`` the training set without its held-out examples."""
        if self._data is None:
            if self._raw is not None:
                tr, te = self._raw
            else:
                from .data import load_dataset
                hp = self.hp
                aug = None if hp.augment == "auto" else hp.augment == "on"
                tr = load_dataset(self.dataset, "train", root=self.data_root, device=self.device, augment=aug,
                                  limit=hp.data_limit or None)
                te = load_dataset(self.dataset, "test", root=self.data_root, device=self.device, augment=False,
                                  limit=hp.test_limit or None)
                self._raw = (tr, te)
            if self.hp.val_split:
                try:
                    tr, self._val = tr.split_off(self.hp.val_split)
                except ValueError as e:
                    raise ValueError(f"val_split={self.hp.val_split}: {e}") from None
            self._data = (tr, te)
        return self._data

    @property
    def val_data(self):
        """The held-out validation examples early stopping goes by (``val_split``), or None (it goes by the test
        loss)."""
        self.data  # loads and splits
        return self._val

    def _build_model(self, seed: int, sparse: bool = True) -> nn.Module:
        from . import models
        from .data import INPUT_SHAPES
        hp = self.hp
        kw = dict(width=hp.width, dropout=hp.dropout, seed=seed, input_shape=INPUT_SHAPES.get(self.dataset))
        model = models.build_model(hp.model, **kw)
        if sparse:
            model = model.to(self.device)
            if hp.layer_impl == "sparse":
                from .layers import parse_ops, sparsify
                model = sparsify(model, path=hp.path, backend=None if hp.backend == "auto" else hp.backend,
                                 ops=parse_ops(hp.ops))
        return model

    def _rates(self, model: nn.Module) -> dict[str, float]:
        hp = self.hp
        return layer_rates(layer_kinds(model), fc=hp.prune_fc, conv=hp.prune_conv, output=hp.prune_output,
                           dense_layers=hp.dense_layers)

    def _groups(self, model: nn.Module, rates: dict[str, float]) -> list[list[str]] | None:
        return global_groups(layer_kinds(model), rates) if self.hp.prune_global else None

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.dir, f"seed_{seed}")

    def round_dir(self, seed: int, r: int) -> str:
        return os.path.join(self.seed_dir(seed), f"round_{r:02d}")

    def n_rounds(self) -> int:
        return 1 if self.hp.control == "oneshot" and not self.hp.oneshot_levels else self.hp.rounds

    def pruned_from(self, r: int) -> int | None:
        """The round whose trained weights round ``r``'s masks are magnitude-pruned from: the previous one for
        ``imp`` and ``continue``, the dense network (round 0) for ``oneshot``; None for round 0 and for the
        controls whose masks come from elsewhere (``reinit``, ``noise``, ``random_prune``)."""
        if r <= 0 or self.hp.control not in ("imp", "oneshot", "continue"):
            return None
        return 0 if self.hp.control == "oneshot" else r - 1

    def source(self) -> "Experiment":
        """The ``imp`` experiment with the same hyperparameters (the ticket that controls compare with)."""
        defaults = ImpHparams()
        hp = dataclasses.replace(self.hp, control="imp", **{k: getattr(defaults, k) for k in CONTROL_SETTINGS})
        path = os.path.join(self.source_dir, "hparams.json") if self.source_dir else None
        if path and os.path.exists(path):
            diff = _hparams_differ(path, hp)
            if diff:
                raise ValueError(f"source {self.source_dir} is not the IMP run of this {self.hp.control} control's "
                                 f"hyperparameters (they differ in {diff}): give the folder of the `imp` run with "
                                 "the same settings")
        return self._sibling(hp)

    def _sibling(self, hp: ImpHparams) -> "Experiment":
        """The experiment of ``hp`` in ``source_dir`` (or its default folder), on this one's device and data."""
        return Experiment(hp, self.run_root, device=self.device, data_root=self.data_root, progress=self.progress,
                          checkpoint_every=self.checkpoint_every, data=self._raw, run_dir=self.source_dir,
                          cuda_graph=self.cuda_graph)

    def dense_source(self) -> "Experiment | None":
        """The experiment whose round 0 (the dense network) this one takes instead of training it: a control's
        :meth:`source`; for an IMP run, the run in ``source_dir`` (None without one), which must train the dense
        network as this one does: the same hyperparameters except the pruning settings (:data:`PRUNING_SETTINGS`:
        a run that prunes at other rates, or other layers, shares the dense network)."""
        if self.hp.control != "imp":
            return self.source()
        if not self.source_dir:
            return None
        path = os.path.join(self.source_dir, "hparams.json")
        theirs = hparams_from_dict(read_json(path))
        # canonical: a step count written "20" there and "20it" here is one budget
        mine, there = canonical_hparams(hparams_dict(self.hp)), canonical_hparams(hparams_dict(theirs))
        differ = sorted(k for k, v in there.items() if k not in PRUNING_SETTINGS + NOT_HASHED and mine.get(k) != v)
        if differ:
            raise ValueError(
                f"source {self.source_dir} trains another dense network: it differs in "
                + ", ".join(f"{k} ({there[k]!r} there, {mine[k]!r} here)" for k in differ)
                + f"; an IMP run takes round 0 only from a run that differs from it in {', '.join(PRUNING_SETTINGS)}")
        return self._sibling(dataclasses.replace(theirs, seed=self.hp.seed))

    def _check_source(self, seeds) -> None:
        """A source folder that is not an experiment is refused (unless waiting for it), and so is an IMP run's
        source that trains another dense network. A control that trains the IMP ticket's masks (and
        random_prune with global pruning, which copies their per-layer counts) refuses to start, before round 0
        trains, when the IMP run has no round-1 masks and it is not told to wait for them."""
        if self.hp.control == "imp" and not self.source_dir and self.wait_for_source > 0:
            raise ValueError("wait_for_source (--wait-for-source) waits for a source run's dense round; an IMP run "
                             "without source_dir (--source) has none: name the source, or leave the wait out")
        if self.hp.control == "imp" and self.source_dir and not self.hp.reuse_dense_round:
            raise ValueError(f"source {self.source_dir}: an IMP run takes only its dense round 0 from a source, "
                             "and reuse_dense_round=False (--no-reuse-dense-round) trains that round here: leave "
                             "one of them out")
        if self.source_dir and self.wait_for_source <= 0 \
                and not os.path.exists(os.path.join(self.source_dir, "hparams.json")):  # (waiting: it may come)
            raise FileNotFoundError(f"source {self.source_dir} is not an experiment folder (no hparams.json): give "
                                    "the IMP run's folder that `sparse-lth imp` printed")
        if self.hp.control == "imp" and self.source_dir \
                and os.path.exists(os.path.join(self.source_dir, "hparams.json")):
            if os.path.abspath(self.source_dir) == os.path.abspath(self.dir):
                raise ValueError(f"source {self.source_dir} is this experiment's own folder")
            self.dense_source()  # raises if it trains another dense network
        needs = self.hp.control in SOURCE_MASK_CONTROLS or (self.hp.control == "random_prune"
                                                           and self.hp.prune_global)
        if not needs or self.n_rounds() < 1 or self.wait_for_source > 0:
            return
        src = self.source()
        missing = [os.path.join(src.round_dir(s, 1), "masks.pt") for s in seeds
                   if not os.path.exists(os.path.join(self.round_dir(s, 1), "masks.pt"))]  # not begun here
        missing = [p for p in missing if not os.path.exists(p)]
        if missing:
            path = missing[0]
            where = "the folder given as its source" if self.source_dir else "the default place for it"
            raise SourceNotReady(
                f"control {self.hp.control!r} needs the IMP ticket's masks ({path}, {where}); run the 'imp' "
                "experiment with the same hyperparameters first, name its folder with source_dir (the CLI's "
                "--source) if it is not <runs>/<its name>, or wait for it (--wait-for-source SECONDS)")

    def _check_model_takes_data(self, x: torch.Tensor | None = None, model: nn.Module | None = None) -> None:
        """One example through the dense model: a model that does not fit the dataset (conv2 on Fashion-MNIST's
        one channel) is refused clearly, before anything is written. ``x``: that example (default: the first
        training image, which loads the data); ``model``: the dense model (default: built here)."""
        x = self.data[0].x[:1].cpu() if x is None else x
        model = (self._build_model(self.hp.seed, sparse=False) if model is None else model).eval()
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:  # (a model of one's own may raise anything on a shape it does not take)
            raise ValueError(f"model {self.hp.model} does not take {self.dataset}'s examples (shape "
                             f"{tuple(x.shape[1:])}): {e}") from None

    def _await_files(self, paths: list[str]) -> bool:
        """Wait (polling every 5 s) up to ``wait_for_source`` seconds for every one of ``paths`` to exist; True
        when they all do."""
        deadline = time.time() + self.wait_for_source
        while not all(os.path.exists(p) for p in paths):
            if time.time() >= deadline:
                return False
            time.sleep(min(5.0, max(0.05, deadline - time.time())))
        return True

    def _source_masks(self, seed: int, r: int, required: bool) -> dict | None:
        path = os.path.join(self.source().round_dir(seed, r), "masks.pt")
        if not self._await_files([path]):
            if not required:
                return None
            raise FileNotFoundError(
                f"control {self.hp.control!r} needs the IMP ticket's masks of round {r} ({path}); run the "
                f"'imp' experiment with the same hyperparameters first (and name its folder with source_dir, "
                f"the CLI's --source, if it is not <runs>/<its name>)")
        return torch.load(path, map_location="cpu", weights_only=False)["masks"]

    # ------------------------------------------------------------------------------------ running
    def plan(self, seeds=None) -> dict:
        """What running this experiment would do, found without training or writing anything: ``dict(dir, exists,
        layers=[(name, kind, weights, rate)], kinds={kind: weights}, total, rounds=[dict(round, live, percent,
        by_kind={kind: percent})], iterations, rewind, dense_from (the folder round 0 would be taken from, or
        None: trained here), seeds={seed: dict(done, planned, running)})``; ``running``: (round, iteration) of a
        round begun and checkpointed; ``not_ready``: why the run, started now, would stop before training (a
        control whose IMP run has no masks yet), or None. The weights remaining per round are exact per kind
        (pools of global pruning
        are per kind); with ``--control reinit|noise`` they are the IMP run's, which prunes as planned here."""
        from .data import INPUT_SHAPES
        from .listing import checkpoint_progress
        hp = self.hp
        try:  # a source folder that is wrong is refused; one not ready yet is said (the plan may come first)
            self._check_source([hp.seed] if seeds is None else list(seeds))
            not_ready = None
        except SourceNotReady as e:
            not_ready = str(e)
        model = self._build_model(hp.seed, sparse=False)
        if self.dataset in INPUT_SHAPES:  # a blank example of the dataset's shape: no data is read
            self._check_model_takes_data(torch.zeros(1, *INPUT_SHAPES[self.dataset]), model)
        shapes = {n: tuple(dense_weight(m).shape) for n, m in prunable_layers(model)}
        kinds = layer_kinds(model)
        rates = self._rates(model)
        groups = self._groups(model, rates)
        if hp.control == "oneshot" and not hp.oneshot_levels:
            rows = pruning_schedule(shapes, rates, groups, hp.rounds)
            if hp.oneshot_remaining:  # each pruned pool keeps that fraction at once
                rows[-1] = {g: v - _n_prune(1.0 - hp.oneshot_remaining if rates[g[0]] > 0 else 0.0, v)
                            for g, v in rows[0].items()}
            rows = [rows[0], rows[-1]]
        else:
            rows = pruning_schedule(shapes, rates, groups, self.n_rounds())
        sizes = {n: math.prod(sh) for n, sh in shapes.items()}
        by_kind = {k: sum(sizes[n] for n in shapes if kinds[n] == k) for k in ("conv", "fc", "output")}
        by_kind = {k: v for k, v in by_kind.items() if v}
        total = sum(sizes.values())
        out_rows = []
        for r, row in enumerate(rows):
            live = sum(row.values())
            kind_live = {k: sum(v for g, v in row.items() if kinds[g[0]] == k) for k in by_kind}
            out_rows.append(dict(round=r, live=live, percent=100.0 * live / total,
                                 by_kind={k: 100.0 * kind_live[k] / by_kind[k] for k in by_kind}))
        dense = self.dense_source() if hp.reuse_dense_round else None
        seeds = [hp.seed] if seeds is None else list(seeds)
        state = {}
        for sd in seeds:
            done = finished_rounds(self.seed_dir(sd))
            running = None
            for r in range(len(rows)):
                ck = os.path.join(self.round_dir(sd, r), "checkpoint.pt")
                if r not in done and os.path.exists(ck):
                    prog = checkpoint_progress(ck)
                    running = (r, prog[0] if prog else None)
            state[sd] = dict(done=len(done), planned=len(rows), running=running)
        return dict(dir=self.dir, exists=os.path.exists(os.path.join(self.dir, "hparams.json")),
                    layers=[(n, kinds[n], sizes[n], rates[n]) for n in shapes], kinds=by_kind, total=total,
                    rounds=out_rows, iterations=self.iterations, rewind=self.rewind_iteration,
                    dense_from=dense.dir if dense is not None else None, seeds=state, not_ready=not_ready)

    def write_hparams(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "hparams.json")
        if not os.path.exists(path):
            d = {k: v for k, v in hparams_dict(self.hp).items() if k not in NOT_HASHED}
            _write_json_atomic(d, path, indent=2, sort_keys=True)

    def run(self, seeds=None, callback: Callable | None = None,
            on_round_start: Callable | None = None, on_round_end: Callable | None = None) -> ImpResult:
        seeds = [self.hp.seed] if seeds is None else list(seeds)
        self._check_source(seeds)
        self._check_model_takes_data()  # loads the data (a missing data folder fails here) before any write
        self.write_hparams()
        res = ImpResult(self.dir, self.hp)
        for s in seeds:
            res.metrics[s] = self.run_seed(s, callback=callback, on_round_start=on_round_start,
                                           on_round_end=on_round_end)
        return res

    def run_seed(self, seed: int, callback: Callable | None = None,
                 on_round_start: Callable | None = None, on_round_end: Callable | None = None) -> list[dict]:
        """Run (or resume) every round of replicate ``seed``; returns the per-round metrics.
        ``on_round_end(metrics)`` is called after each round trained here (not for rounds found finished).
        The replicate's folder is locked meanwhile: a second process on it is refused (:mod:`sparse_lth.runlock`)."""
        self.write_hparams()
        with runlock.hold(self.seed_dir(seed)):
            remove_stale_temporaries(self.seed_dir(seed))
            return self._run_seed(seed, callback, on_round_start, on_round_end)

    def _run_seed(self, seed: int, callback: Callable | None, on_round_start: Callable | None,
                  on_round_end: Callable | None) -> list[dict]:
        hp = dataclasses.replace(self.hp, seed=seed)
        cfg = dataclasses.replace(self.train_cfg, seed=seed)
        sdir = self.seed_dir(seed)
        os.makedirs(sdir, exist_ok=True)
        train_data, test_data = self.data
        init_path = os.path.join(sdir, "init.pt")
        if not os.path.exists(init_path):
            model0 = self._build_model(seed, sparse=False)
            save_atomic({k: v.detach().clone() for k, v in model0.state_dict().items()}, init_path)
        k = self.rewind_iteration
        rewind_path = os.path.join(sdir, "rewind.pt")
        all_metrics = []
        for r in range(self.n_rounds() + 1):
            rdir = self.round_dir(seed, r)
            mpath = os.path.join(rdir, "metrics.json")
            if os.path.exists(mpath):
                all_metrics.append(read_json(mpath))
                continue
            os.makedirs(rdir, exist_ok=True)
            if r == 0 and hp.reuse_dense_round and (hp.control != "imp" or self.source_dir):
                reused = self._reuse_dense_round(seed, init_path, rewind_path)
                if reused is not None:
                    all_metrics.append(reused)
                    if on_round_end is not None:
                        on_round_end(reused)
                    continue
            previous = all_metrics[-1].get("environments") if all_metrics else None
            if previous:
                warn_if_changed(previous[-1], environment(self.device), f"seed {seed} round {r} runs")
            model, masks, start = self.prepare_round(seed, r)
            if on_round_start is not None:
                on_round_start(r, model)

            def on_capture(it, state, _p=rewind_path):
                if not os.path.exists(_p):
                    save_atomic(state, _p)

            capture = k if (r == 0 and k > 0 and not os.path.exists(rewind_path)) else None
            if r == 0 and k == 0 and not os.path.exists(rewind_path):
                copy_atomic(init_path, rewind_path)
            cb = None if callback is None else (lambda it, m, _r=r: callback(_r, it, m))
            out = train(model, train_data, test_data, cfg, start_iteration=start,
                        checkpoint_path=os.path.join(rdir, "checkpoint.pt"),
                        checkpoint_every=self.checkpoint_every, capture_at=capture, on_capture=on_capture,
                        callback=cb, desc=f"seed {seed} round {r}", val_data=self.val_data)
            save_atomic({k_: v.detach().clone() for k_, v in model.state_dict().items()},
                        os.path.join(rdir, "final.pt"))
            metrics = self._round_metrics(model, masks, out, seed, r)
            _write_json_atomic(metrics, mpath)
            ck = os.path.join(rdir, "checkpoint.pt")
            if os.path.exists(ck):
                os.remove(ck)
            all_metrics.append(metrics)
            if on_round_end is not None:
                on_round_end(metrics)
        return all_metrics

    def prepare_round(self, seed: int, r: int, *, from_rewind_point: bool = False, recorded_paths: bool = False
                      ) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
        """Round ``r`` of replicate ``seed`` ready to train: ``(model, masks, start_iteration)``, the model on
        the device with the round's starting weights (θ0 for round 0, the rewind point after, fresh weights for
        ``reinit``, the previous round's final weights for ``continue``, the rewind point plus noise for
        ``noise``), its masks applied and its paths chosen.
        ``from_rewind_point``: start round 0 at the rewind iteration from the rewind point too (the dense
        network's copies of the stability analysis), not at iteration 0 from θ0.
        ``recorded_paths``: a finished round's sparse layers go on the paths its ``metrics.json`` recorded (what
        the analyses and :func:`load_ticket` want: no timing, which needs the data and may choose otherwise);
        a round not finished yet has its paths chosen as the run chooses them."""
        hp = dataclasses.replace(self.hp, seed=seed)
        sdir = self.seed_dir(seed)
        init_path = os.path.join(sdir, "init.pt")
        rewind_path = os.path.join(sdir, "rewind.pt")
        k = self.rewind_iteration
        model = self._build_model(seed)
        _load_weights(model, torch.load(init_path, map_location=self.device, weights_only=False))
        masks = self._round_masks(model, seed, r)
        start = 0 if (r == 0 and not from_rewind_point) else k
        if r == 0 and start == 0:
            pass  # θ0
        elif r > 0 and hp.control == "reinit":
            fresh = self._build_model(_reinit_seed(seed, r), sparse=False)
            _load_weights(model, fresh.state_dict())
        elif r > 0 and hp.control == "continue":
            _load_weights(model, torch.load(os.path.join(self.round_dir(seed, r - 1), "final.pt"),
                                            map_location=self.device, weights_only=False))
        elif r > 0 and hp.control == "noise":
            _load_weights(model, self._noisy_start(seed, r, init_path, rewind_path, masks))
        else:
            _load_weights(model, torch.load(rewind_path, map_location=self.device, weights_only=False))
        apply_masks(model, masks, path=None if hp.path == "auto" else hp.path)
        recorded = os.path.join(self.round_dir(seed, r), "metrics.json") if recorded_paths else None
        if recorded and os.path.exists(recorded) and read_json(recorded).get("paths"):
            from .train import force_paths
            force_paths(model, read_json(recorded)["paths"])
        elif hp.layer_impl == "sparse" and hp.path == "auto":
            from .train import choose_training_paths  # timed on the device (or with --timed-paths), as it trains
            choose_training_paths(model, self.data[0], self.train_cfg, seed, self.device, timed=hp.timed_paths)
        return model, masks, start

    def _noisy_start(self, seed: int, r: int, init_path: str, rewind_path: str, masks: dict) -> dict:
        """θk with N(0, (noise_std * std of the layer's θ0)^2) added to every prunable weight (control ``noise``);
        the generator is seeded from (seed, round), so a resumed round draws the same noise."""
        start = torch.load(rewind_path, map_location="cpu", weights_only=False)
        init = torch.load(init_path, map_location="cpu", weights_only=False)
        g = torch.Generator().manual_seed(_reinit_seed(seed, r) + 29)
        out = dict(start)
        for n in sorted(masks):
            w = start[f"{n}.weight"]
            std = float(init[f"{n}.weight"].double().std())
            out[f"{n}.weight"] = w + (self.hp.noise_std * std) * torch.randn(w.shape, generator=g, dtype=w.dtype)
        return {k: v.to(self.device) for k, v in out.items()}

    def _reuse_dense_round(self, seed: int, init_path: str, rewind_path: str) -> dict | None:
        """A control's round 0 trains the dense network from the same θ0 with the same hyperparameters as the IMP
        run it is compared with (and an IMP run's, as its source's: :meth:`dense_source`): when that run has
        finished its round 0 for this seed, from an identical θ0, take its masks, final weights, rewind point and
        metrics instead of training again (the metrics name the source: ``reused_from``). Returns the metrics, or
        None (then the round is trained here)."""
        if self.hp.control == "imp" and not self._await_files([os.path.join(self.source_dir, "hparams.json")]):
            return None  # (waited for a source that never came)
        src = self.dense_source()
        sdir = src.round_dir(seed, 0)
        files = [os.path.join(sdir, f) for f in ("metrics.json", "masks.pt", "final.pt")]
        src_init = os.path.join(src.seed_dir(seed), "init.pt")
        src_rewind = os.path.join(src.seed_dir(seed), "rewind.pt")
        if not self._await_files(files + [src_init, src_rewind]):  # a control started beside its IMP run waits
            return None
        mine = torch.load(init_path, map_location="cpu", weights_only=False)
        theirs = torch.load(src_init, map_location="cpu", weights_only=False)
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return None  # another θ0 (e.g. the model code changed between the runs): train it here
        rdir = self.round_dir(seed, 0)
        for f in files[1:]:
            copy_atomic(f, os.path.join(rdir, os.path.basename(f)))
        if not os.path.exists(rewind_path):
            copy_atomic(src_rewind, rewind_path)
        metrics = read_json(files[0])
        metrics.update(control=self.hp.control, reused_from=os.path.relpath(sdir, self.dir))
        _write_json_atomic(metrics, os.path.join(rdir, "metrics.json"))  # last: a cut-short copy is redone
        return metrics

    def _round_masks(self, model: nn.Module, seed: int, r: int) -> dict[str, torch.Tensor]:
        """The masks of round ``r`` (computed once, saved in ``masks.pt``, reloaded on resume)."""
        path = os.path.join(self.round_dir(seed, r), "masks.pt")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=False)["masks"]
        hp = self.hp
        layers = prunable_layers(model)
        shapes = {n: tuple(dense_weight(m).shape) for n, m in layers}
        rates = self._rates(model)
        if r == 0:
            masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
        elif hp.control in SOURCE_MASK_CONTROLS:
            masks = self._source_masks(seed, r, required=True)
        elif hp.control == "random_prune":
            src = self._source_masks(seed, r, required=hp.prune_global)
            if src is not None:
                keep = {n: int(mk.sum()) for n, mk in src.items()}
            else:  # layer-wise: each layer's count is known without the ticket
                keep = {g[0]: v for g, v in pruning_schedule(shapes, rates, None, r)[-1].items()}
            g = torch.Generator().manual_seed(_reinit_seed(seed, r) + 17)
            masks = random_masks(shapes, keep, g)
        else:  # imp, oneshot, continue: magnitude pruning of trained weights (the previous round's, or round 0's)
            prev = self.round_dir(seed, self.pruned_from(r))
            prev_masks = torch.load(os.path.join(prev, "masks.pt"), map_location="cpu", weights_only=False)["masks"]
            final = torch.load(os.path.join(prev, "final.pt"), map_location="cpu", weights_only=False)
            weights = {n: final[f"{n}.weight"] for n in shapes}
            groups = self._groups(model, rates)
            if hp.control == "oneshot":
                if hp.oneshot_remaining:
                    rates = {n: (1.0 - hp.oneshot_remaining if v > 0 else 0.0) for n, v in rates.items()}
                else:
                    rates = _oneshot_fractions(shapes, rates, groups, r if hp.oneshot_levels else hp.rounds)
            starts = None if hp.prune_score == "magnitude" else torch.load(  # the others compare with θk
                os.path.join(self.seed_dir(seed), "rewind.pt"), map_location="cpu", weights_only=False)
            masks = prune_by_score(weight_scores(hp.prune_score, weights, starts), prev_masks, rates, groups)
        masks = {n: mk.cpu().bool() for n, mk in masks.items()}
        save_atomic({"masks": masks}, path)
        return masks

    def _round_metrics(self, model: nn.Module, masks: dict, out: dict, seed: int, r: int) -> dict:
        counts = count_masks(masks)
        live, total = live_and_total(masks)
        kinds = layer_kinds(model)
        return dict(
            round=r, seed=seed, control=self.hp.control, model=self.hp.model,
            rewind_iteration=self.rewind_iteration, start_iteration=out["start_iteration"],
            iterations=out["iterations"],
            remaining={n: dict(live=c[0], total=c[1], density=c[0] / c[1], kind=kinds.get(n))
                       for n, c in counts.items()},
            remaining_total=live, total_weights=total, density=live / total, percent_remaining=100.0 * live / total,
            test_acc=out["test_acc"], test_loss=out["test_loss"], train_acc=out["train_acc"],
            train_loss=out["train_loss"], early_stop_iteration=out["early_stop_iteration"],
            early_stop_test_acc=out["early_stop_test_acc"], early_stop_on=out["early_stop_on"],
            wall_time=out["wall_time"],
            step_time=out["step_time"], time_per_step=out["time_per_step"], steps_timed=out["steps"],
            resumed_from=out["resumed_from"],
            paths=out["paths"], backends=out["backends"], device=str(self.device),
            environments=out["environments"], cuda_graph=out.get("cuda_graph"), curve=out["curve"])


def check_experiment_dir(run_dir: str) -> str:
    """``run_dir`` (without a trailing slash) if it is an experiment folder (it has hparams.json), else a clear
    FileNotFoundError."""
    run_dir = os.fspath(run_dir).rstrip("/")
    if not os.path.exists(os.path.join(run_dir, "hparams.json")):
        raise FileNotFoundError(f"{run_dir} is not an experiment folder (no hparams.json); give the folder "
                                "`sparse-lth imp` printed")
    return run_dir


def replicate_seeds(run_dir: str) -> list[int]:
    """The seeds of an experiment folder's replicates (its ``seed_<s>`` folders), ascending."""
    found = (re.fullmatch(r"seed_(-?\d+)", d) for d in os.listdir(run_dir))  # --seed takes negative seeds too
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(run_dir, m.group(0))))


def open_experiment(run_dir: str, seed: int, **kwargs) -> Experiment:
    """The :class:`Experiment` of an existing run folder, as replicate ``seed``; ``kwargs`` as for Experiment
    (device, data_root, progress, checkpoint_every)."""
    run_dir = check_experiment_dir(run_dir)
    hp = hparams_from_dict(read_json(os.path.join(run_dir, "hparams.json")))
    return Experiment(dataclasses.replace(hp, seed=seed), run_dir=run_dir, **kwargs)


def load_ticket(run_dir: str, round: int, *, seed: int | None = None, weights: str = "start",
                device: str | torch.device = "cpu", data_root: str | None = None) -> nn.Module:
    """The network of round ``round`` (finished) of the IMP run (or control) in ``run_dir``, as a model: its masks
    applied (sparse layers, or masked plain layers for ``layer_impl="masked"``) and the weights it started from
    (``weights="start"``: θ0 for round 0, the rewind point after, a reinit's fresh draw, the noise control's noisy
    start) or the ones its training ended with (``"final"``). ``seed``: the replicate (default: the lowest one).
    Reads the folder and writes nothing; the round must have finished. ``data_root`` is needed only when the
    training budget is counted in epochs (to count them).

    The model's ``state_dict()`` holds the dense weights and ``<layer>.weight_mask``: the plain network of the
    same name (``build_model``) loads it with ``strict=False``."""
    if weights not in ("start", "final"):
        raise ValueError(f"weights must be 'start' or 'final', got {weights!r}")
    run_dir = check_experiment_dir(run_dir)
    seeds = replicate_seeds(run_dir)
    if seed is None:
        if not seeds:
            raise FileNotFoundError(f"{run_dir} holds no replicate (seed_*) yet")
        seed = seeds[0]
    elif seed not in seeds:
        raise FileNotFoundError(f"{run_dir} has no replicate of seed {seed} (it has {seeds})")
    exp = open_experiment(run_dir, seed, device=device, data_root=data_root, progress=False)
    done = finished_rounds(exp.seed_dir(seed))
    if round not in done:
        raise FileNotFoundError(f"round {round} of seed {seed} has not finished in {run_dir} (finished: "
                                f"{sorted(done) or 'none'})")
    model, _, _ = exp.prepare_round(seed, round, recorded_paths=True)
    if weights == "final":
        _load_weights(model, torch.load(os.path.join(done[round], "final.pt"), map_location=exp.device,
                                        weights_only=False))
    return model


def finished_rounds(seed_dir: str) -> dict[int, str]:
    """``{round: folder}`` of the rounds of a replicate folder that have finished (their metrics.json exists)."""
    out = {}
    if os.path.isdir(seed_dir):
        for name in os.listdir(seed_dir):
            if name.startswith("round_") and os.path.exists(os.path.join(seed_dir, name, "metrics.json")):
                out[int(name[6:])] = os.path.join(seed_dir, name)
    return dict(sorted(out.items()))


def _write_json_atomic(obj, path: str, indent: int = 1, sort_keys: bool = False) -> None:
    """JSON to ``path`` atomically (:func:`sparse_lth._files.write_atomic`)."""
    def dump(f):
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")
    write_atomic(path, dump)


def remove_stale_temporaries(seed_dir: str) -> list[str]:
    """Remove what a process killed while saving left in a replicate's folder and its round folders (not below
    them): half-written files (``*.tmp<pid>``) whose writer is gone (an analysis that writes beside the run without
    its lock, ``anatomy.json`` say, may be alive), and the ``checkpoint.pt`` of a round whose ``metrics.json`` was
    written (a kill between the two); returns their paths. Under the folder's lock (:func:`runlock.hold`)."""
    gone = []
    for d in [seed_dir, *sorted(glob.glob(os.path.join(seed_dir, "round_*")))]:
        for f in os.scandir(d):
            if f.is_file() and TEMPORARY.search(f.name) and not _process_alive(int(f.name.rsplit(".tmp", 1)[1])):
                os.remove(f.path)
                gone.append(f.path)
        ck = os.path.join(d, "checkpoint.pt")
        if d != seed_dir and os.path.exists(os.path.join(d, "metrics.json")) and os.path.exists(ck):
            os.remove(ck)
            gone.append(ck)
    return gone


def _process_alive(pid: int) -> bool:
    """Is there a process ``pid`` on this machine (another user's too)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except PermissionError:  # another user's
        return True
    return True


SEED_LIMIT = 2 ** 40  # |seed| below it: every seed derived from it (below) fits in 64 bits


def _reinit_seed(seed: int, r: int) -> int:
    return 1_000_003 * (seed + 1) + 7_919 * r + 1


def _load_weights(model: nn.Module, state: dict) -> None:
    """Load the weights and biases of ``state`` into ``model`` (masks in ``state`` are ignored: they are set
    separately by :func:`apply_masks`). A missing weight is an error."""
    own = model.state_dict()
    sub = {k: v for k, v in state.items() if k in own and not k.endswith("weight_mask")}
    missing = [k for k in own if k not in sub and not k.endswith("weight_mask")]
    if missing:
        raise ValueError(f"state is missing {missing}")
    model.load_state_dict(sub, strict=False)


def run_imp(hparams: ImpHparams, run_root: str = "runs", *, seeds=None, replicates: int | None = None,
            device: str | torch.device = "cpu", data_root: str | None = None, progress: bool = True,
            checkpoint_every: int = 1000, run_dir: str | None = None, wait_for_source: float = 0.0,
            callback: Callable | None = None, on_round_start: Callable | None = None,
            on_round_end: Callable | None = None, report: bool = False, data=None,
            source_dir: str | None = None, on_start: Callable | None = None, cuda_graph: bool = False) -> ImpResult:
    """Run (or resume) an IMP experiment; see the module docstring.

    ``seeds`` (list) or ``replicates`` (n: seeds ``hparams.seed .. hparams.seed + n - 1``); default: the single
    seed ``hparams.seed``. ``data``: ``(train, test)`` datasets to use instead of loading ``hparams.dataset``
    (the caller is then responsible for giving the same data on a re-run). ``source_dir``: for a control, the
    folder of the IMP run it compares with (default: ``<run_root>/<that experiment's name>``); for an IMP run, an
    IMP run to take the dense round from (see the module docstring).
    ``on_start(experiment)`` runs once the hyperparameters are checked, before anything trains (its folder is
    ``experiment.dir``); ``callback(round, iteration, model)`` runs after every training step (an exception there
    stops the run; re-running resumes); ``on_round_start(round, model)`` before a round trains,
    ``on_round_end(metrics)`` after.
    ``report``: write the report (figures and table) into ``<experiment>/report`` at the end, including sibling
    control experiments found in ``run_root``. ``cuda_graph``: on a GPU, replay each training step as a captured
    CUDA graph (:class:`~sparse_lth.train.TrainConfig`'s ``cuda_graph``; how the run executes, not part of its
    hyperparameters).
    """
    if seeds is None:
        seeds = [hparams.seed + i for i in range(replicates or 1)]
    exp = Experiment(hparams, run_root, device=device, data_root=data_root, progress=progress,
                     checkpoint_every=checkpoint_every, run_dir=run_dir, wait_for_source=wait_for_source,
                     data=data, source_dir=source_dir, cuda_graph=cuda_graph)
    if on_start is not None:
        on_start(exp)
    res = exp.run(seeds, callback=callback, on_round_start=on_round_start, on_round_end=on_round_end)
    if report:
        from .report import write_report, related_experiments
        write_report(related_experiments(exp.dir), os.path.join(exp.dir, "report"))
    return res


def type_hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(ImpHparams)

"""The training loop: one round of (sparse) training, with evaluation, checkpoint/resume and a rewind hook.

``train(model, train_data, test_data, cfg)`` trains ``model`` for iterations ``[start_iteration, cfg.iterations)``
with a multi-step learning-rate schedule and linear warmup, evaluates every ``cfg.eval_every`` iterations (test
loss/accuracy, and train loss/accuracy on a fixed subset of the training set), and returns the metrics.

Determinism and exact resume: batch ``i`` comes from ``train_data.batch(i, batch_size, seed)`` (a pure function
of its arguments), and, when the model has dropout, the global torch RNG is re-seeded from ``(seed, i)`` before
step ``i``, so a run restarted from a checkpoint (model state, optimizer state, iteration, metrics so
far) takes exactly the steps the uninterrupted run took. On CPU the result is bit-identical.

Masks: a layer of :mod:`sparse_lth.layers` keeps its own pruned weights at zero. A plain ``nn.Linear``/``nn.Conv2d``
that carries a bool buffer ``weight_mask`` (the dense-masking baseline, see :func:`sparse_lth.imp.apply_masks`) is
masked here: its gradient is masked before each optimizer step and its weight re-masked after it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._files import write_atomic
from .environment import environment, warn_if_changed

OPTIMIZERS = ("sgd", "adam", "adamw")
OPTIMIZER_IMPLS = ("torch", "sparse_lth")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (one IMP round)."""

    optimizer: str = "sgd"          # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.0           # sgd only
    nesterov: bool = False          # sgd only
    weight_decay: float = 0.0
    batch_size: int = 128
    iterations: int = 1000          # total training budget, in iterations (steps)
    milestones: tuple[int, ...] = ()  # iterations at which the lr is multiplied by gamma
    gamma: float = 0.1
    warmup: int = 0                 # linear warmup over this many iterations (0: none)
    eval_every: int = 100           # evaluate every N iterations (and at the start and the end)
    train_eval_size: int = 1000     # train loss/accuracy measured on the first N training examples (0: skip)
    eval_batch_size: int = 1000
    seed: int = 0                   # data order (and dropout) seed
    progress: bool = True           # tqdm progress bar
    optimizer_impl: str = "torch"   # torch | sparse_lth (sparse_lth.optim; faster with Adam on a CPU: README)
    precision: str = "fp32"         # fp32 | bf16 (forward passes under bf16 autocast; weights and optimizer in fp32)
    cuda_graph: bool = False        # CUDA only: replay each training step as a captured CUDA graph (see train())

    def __post_init__(self):
        self.milestones = tuple(int(m) for m in self.milestones)
        check_train_config(self)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after the step under way, with a checkpoint written at that
    iteration: calling :func:`train` again with the same checkpoint resumes exactly there."""

    def __init__(self, signum: int, iteration: int, checkpoint_path: str):
        self.signum, self.iteration, self.checkpoint_path = signum, iteration, checkpoint_path
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}, "
                         f"checkpoint written ({checkpoint_path})")


@contextlib.contextmanager
def _stop_after_step(enabled: bool):
    """While training with a checkpoint: SIGINT and SIGTERM only ask the loop to stop after the step under way
    (``pending[0]`` becomes the signal); a second one of the same signal acts at once, as it would have
    without this (the previous handler is put back at the first). Only in the main thread (where signals go)."""
    pending: list = [None]
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {}

    def handler(signum, frame):
        if pending[0] is None:
            pending[0] = signum
            signal.signal(signum, previous[signum])  # the next one is not deferred
            try:  # (Ctrl-C on `sparse-lth imp ... | tee log` closes the pipe first: the step must still end)
                print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (a second "
                      "one stops at once)", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        # set from outside Python (cannot be put back), or ignored (a job started with `&` from a script, or under
        # nohup: Ctrl-C at the terminal is not for it, as Python itself leaves an ignored SIGINT ignored)
        if previous[sig] is None or previous[sig] == signal.SIG_IGN:
            del previous[sig]
            continue
        signal.signal(sig, handler)
    try:
        yield pending
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if pending[0] is not None:  # arrived after the loop's last look: deliver it as it would have been
        signal.raise_signal(pending[0])


# TrainConfig fields that say how a run executes, not what it computes: a run killed with one setting resumes with
# the other (cuda_graph replays the same step; with torch.optim's Adam it takes torch's capturable variant, whose
# bias corrections are fp32 device arithmetic instead of the host's double: the same trajectory to rounding)
EXECUTION_ONLY = ("progress", "cuda_graph")


def _trajectory(config: dict) -> dict:
    """A checkpoint's configuration without its execution-only fields (a run killed with the progress bar on
    resumes with it off, and the other way round), a field added since it was written at its default."""
    full = {**_DEFAULTS, **config}
    full["milestones"] = tuple(full["milestones"])
    return {k: v for k, v in full.items() if k not in EXECUTION_ONLY}


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` with a clear message for a bad configuration."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")
    if cfg.optimizer_impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"unknown optimizer_impl {cfg.optimizer_impl!r}; choose one of {OPTIMIZER_IMPLS}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):  # (NaN passed `< 0`, inf trained garbage)
        raise ValueError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}")
    for name in ("batch_size", "iterations", "eval_every", "eval_batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0 or cfg.train_eval_size < 0:
        raise ValueError("warmup and train_eval_size must be >= 0")
    if not (cfg.gamma > 0 and math.isfinite(cfg.gamma)):
        raise ValueError(f"gamma must be a finite number > 0, got {cfg.gamma}")
    ms = list(cfg.milestones)
    if any(b <= a for a, b in zip(ms, ms[1:])) or any(m <= 0 for m in ms):  # (a repeat decayed twice there)
        raise ValueError(f"milestones must be positive and strictly increasing, got {cfg.milestones}")
    if not _is_int_in(cfg.seed, 2 ** 63):
        raise ValueError(f"seed must be an integer that fits in 64 bits, got {cfg.seed!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; choose one of {PRECISIONS}")
    if not isinstance(cfg.cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cfg.cuda_graph!r}")


def _is_int_in(v, limit: int) -> bool:
    """Whether ``v`` is an integer (of any integer type, not a bool) in ``[-limit, limit)``."""
    if isinstance(v, bool):
        return False
    try:
        v = operator.index(v)
    except TypeError:
        return False
    return -limit <= v < limit


_DEFAULTS = dataclasses.asdict(TrainConfig())


def autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """The context a forward pass runs in at ``precision``: bf16 autocast on the device, or nothing (fp32).
    ``cache_enabled=False`` for a step captured in a CUDA graph (autocast's cast cache must not outlive it)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              cache_enabled=cache_enabled)
    return contextlib.nullcontext()


@functools.cache
def _import_optimizer_machinery() -> None:
    """The first torch optimizer a process builds imports ``torch._dynamo`` (1-2 s on a CPU): done once, before a
    training's clock starts, so that it does not land in the first round's ``wall_time``."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate used by step ``iteration`` (0-based): multi-step decay times linear warmup."""
    lr = cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if iteration >= m)
    if cfg.warmup > 0:
        lr *= min(1.0, (iteration + 1) / cfg.warmup)
    return lr


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters (build it AFTER the masks/paths are set: a sparse
    layer's parameters depend on its path). ``model``: a module, or an iterable of parameters (as the timed path
    choice builds one per timed copy of a layer, see :func:`optimizer_factory`)."""
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    if cfg.optimizer_impl == "torch":
        ns = torch.optim
    else:
        from . import optim as ns  # noqa: F811  (mask-aware drop-ins)
    if cfg.optimizer == "sgd":
        return ns.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                      weight_decay=cfg.weight_decay)
    # in a CUDA graph Adam's step counts must live on the device (capturable): the graph replays the bias
    # corrections' arithmetic instead of freezing the values of the step it was captured at
    extra = dict(capturable=True) if cfg.cuda_graph else {}
    if cfg.optimizer == "adam":
        return ns.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    return ns.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def optimizer_factory(cfg: TrainConfig) -> Callable[[list], torch.optim.Optimizer]:
    """``params -> build_optimizer(params, cfg)``: the training's optimizer for the timed path choice
    (:func:`sparse_lth.layers.choose_paths`'s ``optimizer``), whose timed steps then include its step. Built as
    the eager step is (never ``capturable``: the timing runs outside any graph, and torch's capturable Adam refuses
    CPU tensors, where ``cuda_graph`` is refused later with a clear message)."""
    return functools.partial(build_optimizer, cfg=dataclasses.replace(cfg, cuda_graph=False))


def choose_training_paths(model: nn.Module, data, cfg: TrainConfig, seed: int, device: torch.device,
                          timed: bool = False) -> bool:
    """Choose the path of each ``auto`` layer of ``model`` as ``cfg``'s training will run it, where the choice is
    timed: always on CUDA, on the CPU when ``timed`` (else the CPU's density rule stands, bit-reproducible). Timed
    with a real batch (``data``'s first batch in ``seed``'s order), under the training's autocast (bf16 favours
    other paths than fp32), each timed step ending with the training's optimizer step (:func:`optimizer_factory`).
    The IMP driver and ``sparse-lth train`` call it after the masks are set. Returns whether it timed."""
    if not (torch.device(device).type == "cuda" or timed):
        return False
    from .layers import choose_paths
    with autocast(cfg.precision, device):
        choose_paths(model, data.batch(0, cfg.batch_size, seed)[0], timed=timed, optimizer=optimizer_factory(cfg))
    return True


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """After ``load_state_dict``: Adam's ``capturable`` as this run executes (with CUDA graphs or without), not as
    the checkpoint's run did. Loading puts back the saved groups, flag included, so a run checkpointed without
    graphs and resumed with them would keep its step counts on the host, and every capture would fail. And each
    step count goes where the flag wants it, beside its parameter or on the CPU: the checkpoint is loaded onto the
    run's device, and torch's non-capturable Adam reads a step count on a GPU with ``.item()``, two host syncs
    per parameter at every step of a resumed round."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            dev = p.device if capturable else torch.device("cpu")
            if isinstance(step, torch.Tensor) and (step.device != dev or step.dtype != torch.float32):
                optimizer.state[p]["step"] = step.to(device=dev, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- masks (plain)
def plain_masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Plain (non-sparse) modules carrying a ``weight_mask`` buffer: masked by the training loop itself."""
    return [(n, m) for n, m in model.named_modules()
            if not hasattr(m, "set_mask") and isinstance(getattr(m, "weight_mask", None), torch.Tensor)]


def layer_paths(model: nn.Module) -> dict[str, str]:
    """``{name: path label}`` of every sparse layer (``"dense"``, ``"sparse"``, or e.g.
    ``"sparse/weight_grad:dense"`` when some ops of its sparse path run dense) and ``"masked"`` for plain masked
    ones."""
    out = {n: str(getattr(m, "path_label", m.path)) for n, m in model.named_modules()
           if hasattr(m, "set_mask") and hasattr(m, "path")}
    out.update({n: "masked" for n, _ in plain_masked_modules(model)})
    return out


def layer_backends(model: nn.Module) -> dict[str, str]:
    out = {n: str(getattr(m, "backend", None)) for n, m in model.named_modules()
           if hasattr(m, "set_mask") and hasattr(m, "path")}
    out.update({n: "torch" for n, _ in plain_masked_modules(model)})
    return out


def force_paths(model: nn.Module, paths: dict[str, str]) -> None:
    """Put every sparse layer back on its recorded path and per-op configuration (``layer_paths``' labels; after
    ``load_state_dict``, before building the optimizer), so that a resumed run computes what the interrupted one
    did even where a timed choice would now pick differently."""
    mods = dict(model.named_modules())
    for name, label in paths.items():
        m = mods.get(name)
        if m is None or not hasattr(m, "set_mask") or label == "masked":
            continue
        if hasattr(m, "restore_path"):
            m.restore_path(label)
        elif label in ("dense", "sparse") and getattr(m, "path", None) != label:
            m.set_mask(m.mask, path=label)


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over an iterable of ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in batches:
            out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return loss_sum / total, correct / total


def subset_batches(data, n: int, bs: int):
    """Batches of ``bs`` over the first ``n`` examples of a DeviceDataset, in order, without augmentation (how
    train accuracy is measured here: :func:`evaluate` over them)."""
    x, y = data.x[:n], data.y[:n]
    for i in range(0, x.shape[0], bs):
        yield x[i:i + bs], y[i:i + bs]


def early_stop_on(curve: list[dict]) -> str:
    """``"val"`` when every evaluation of ``curve`` has a validation loss (a held-out set), else ``"test"``."""
    return "val" if curve and all("val_loss" in r for r in curve) else "test"


def early_stop(curve: list[dict], on: str | None = None) -> tuple[int, float]:
    """(iteration, test accuracy) at the evaluation with the minimum validation loss (the paper's early-stopping
    criterion; ties go to the earliest). A curve without validation rows (no held-out set: ``val_loss`` absent)
    stops at the minimum test loss instead. ``on="test"`` (or ``"val"``) forces the criterion."""
    if not curve:
        raise ValueError("no evaluations recorded")
    key = f"{on or early_stop_on(curve)}_loss"
    best = min(curve, key=lambda r: (r[key], r["iteration"]))
    return int(best["iteration"]), float(best["test_acc"])


# ---------------------------------------------------------------------------------------------------- checkpoint
def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`sparse_lth._files.write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def _step_seed(seed: int, iteration: int) -> int:
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + 12345) % (2 ** 62)


# --------------------------------------------------------------------------------------------------------- train
def train(model: nn.Module, train_data, test_data, cfg: TrainConfig, *,
          start_iteration: int = 0,
          checkpoint_path: str | None = None,
          checkpoint_every: int = 0,
          capture_at: int | None = None,
          on_capture: Callable[[int, dict], None] | None = None,
          callback: Callable[[int, nn.Module], None] | None = None,
          desc: str | None = None,
          val_data=None) -> dict:
    """Train ``model`` in place for iterations ``[start_iteration, cfg.iterations)``; return the metrics.

    - ``train_data``/``test_data``: :class:`sparse_lth.data.DeviceDataset`-like (``.batch(i, bs, seed)``,
      ``.eval_batches(bs)``, ``.x``/``.y``); the model must already be on their device.
    - ``val_data``: held-out training examples (:meth:`~sparse_lth.data.DeviceDataset.split_off`), evaluated with
      the test set; early stopping then goes by their loss (as the paper), not the test loss.
    - ``checkpoint_path``: if the file exists the run resumes from it (model, optimizer state, iteration, metrics
      so far, layer paths); a checkpoint is written there every ``checkpoint_every`` iterations (0: never).
      The caller deletes it when it no longer needs it.
    - ``capture_at``/``on_capture``: ``on_capture(k, state_dict)`` receives a copy of the weights after ``k``
      steps (``k == start_iteration``: before any step), e.g. the rewind point of IMP.
    - ``callback(iteration, model)`` is called after every step (``iteration`` = steps done); an exception
      raised there stops training (the last checkpoint stays).
    - ``cfg.cuda_graph`` (CUDA only): each step is replayed as a captured CUDA graph (:class:`_GraphedStep`:
      three eager warm-up steps and a capture per learning rate and batch shape; a failed capture warns and the
      run goes on eagerly); Adam is built capturable. The loss, weights and metrics are the eager run's, to the
      rounding of torch's capturable Adam when it is torch.optim's.
    - With a ``checkpoint_path``, Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, ``kill``) stops training
      after the step under way, writes a checkpoint at that iteration and raises :class:`TrainingInterrupted` (a
      ``KeyboardInterrupt``): nothing done is lost, and the resume is exact. A second signal acts at once.

    Returns ``dict(curve=[{iteration, lr, test_loss, test_acc, train_loss, train_acc[, val_loss, val_acc]}...],
    early_stop_iteration, early_stop_test_acc (the test accuracy there), early_stop_on ("val" or "test"),
    test_acc, test_loss, train_acc, train_loss, iterations, steps, wall_time (steps + evaluations, summed over
    resumes), step_time (seconds in steps; on a GPU timed over each stretch of steps between evaluations,
    checkpoints and callbacks, since the loop waits for the device only there), time_per_step, paths, backends,
    resumed_from, environments, cuda_graph)``; ``cuda_graph``: None without graphs, else this call's
    ``{captures, replayed_steps, eager_steps, failed}``; ``environments``: the
    :func:`sparse_lth.environment.environment` of each stretch of training that ran under another one, with the
    iteration it started from (one unless resumed elsewhere; a resume under other numerics warns).
    """
    check_train_config(cfg)
    if not 0 <= start_iteration < cfg.iterations:
        raise ValueError(f"start_iteration {start_iteration} outside [0, iterations={cfg.iterations})")
    if capture_at is not None and not start_iteration <= capture_at <= cfg.iterations:
        raise ValueError(f"capture_at {capture_at} outside [{start_iteration}, {cfg.iterations}]")
    if checkpoint_every < 0:
        raise ValueError("checkpoint_every must be >= 0")
    x_dev = train_data.x.device
    if x_dev.type == "cuda" and x_dev.index is not None:
        # Triton launches on the current device: data on cuda:1 with cuda:0 current ran every kernel on the wrong
        # device (one process per GPU: --device cuda:N)
        torch.cuda.set_device(x_dev)
    if cfg.cuda_graph:
        _CudaGraphs.check_device(x_dev)
    p0 = next(iter(model.parameters()), None)
    if p0 is not None and p0.device != x_dev:
        raise ValueError(f"model is on {p0.device} but the training data is on {x_dev}; move one of them")

    curve: list[dict] = []
    it = start_iteration
    _import_optimizer_machinery()  # (before the clock: a one-time import is not this run's time)
    t_start = time.perf_counter()
    wall_before = 0.0               # wall time (steps + evaluations) spent before a resume
    elapsed = 0.0                   # time spent in training steps only
    steps_timed = 0
    resumed_from = None
    env = environment(x_dev)
    environments = [dict(from_iteration=start_iteration, **env)]
    ck = None
    if checkpoint_path and os.path.exists(checkpoint_path):
        ck = torch.load(checkpoint_path, map_location=x_dev, weights_only=False)
        if _trajectory(ck.get("config") or {}) != _trajectory(dataclasses.asdict(cfg)) \
                or ck.get("start_iteration") != start_iteration:
            raise ValueError(f"checkpoint {checkpoint_path} was written by a different training configuration; "
                             "delete it to start over")
        model.load_state_dict(ck["model"])
        force_paths(model, ck["paths"])
        it, curve, elapsed, steps_timed = ck["iteration"], ck["curve"], ck["elapsed"], ck["steps_timed"]
        wall_before = ck["wall"]
        resumed_from = it
        before = ck.get("environments") or []
        if before:
            last = {k: v for k, v in before[-1].items() if k != "from_iteration"}
            warn_if_changed(last, env, f"training resumed at iteration {it} ({checkpoint_path})")
            environments = before + ([dict(from_iteration=it, **env)] if last != env else [])
        else:  # a checkpoint from before environments were recorded: only the resumed stretch is known
            environments = [dict(from_iteration=it, **env)]
    optimizer = build_optimizer(model, cfg)
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        _set_capturable(optimizer, cfg.cuda_graph)
        del ck
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    masked = [(m, m.weight_mask.to(m.weight.dtype)) for _, m in plain_masked_modules(model)]
    with torch.no_grad():  # plain masked layers start masked
        for m, fm in masked:
            m.weight.mul_(fm)
    # re-seed the global RNG per step only where the model draws random numbers (dropout): it costs time
    stochastic = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())

    def do_eval(i: int) -> None:
        with autocast(cfg.precision, x_dev):  # the network as it trains
            test_loss, test_acc = evaluate(model, test_data.eval_batches(cfg.eval_batch_size))
            row = dict(iteration=i, lr=lr_at(cfg, max(i - 1, 0)), test_loss=test_loss, test_acc=test_acc)
            if val_data is not None:
                row["val_loss"], row["val_acc"] = evaluate(model, val_data.eval_batches(cfg.eval_batch_size))
            if cfg.train_eval_size:
                row["train_loss"], row["train_acc"] = evaluate(
                    model, subset_batches(train_data, cfg.train_eval_size, cfg.eval_batch_size))
        curve.append(row)

    def do_checkpoint(i: int) -> None:
        save_atomic(dict(config=dataclasses.asdict(cfg), start_iteration=start_iteration, iteration=i,
                         model=model.state_dict(), optimizer=optimizer.state_dict(), curve=curve,
                         paths=layer_paths(model), elapsed=timer.elapsed, steps_timed=steps_timed,
                         environments=environments, wall=wall_before + time.perf_counter() - t_start), checkpoint_path)

    if resumed_from is None:
        if capture_at == it and on_capture is not None:
            on_capture(it, _copy_state(model))
        do_eval(it)

    def one_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on (x, y), the optimizer's learning rate already set; returns the loss tensor.
        With CUDA graphs the gradients are zeroed in place, not freed: they then keep their addresses from the
        warm-up steps on, so sparse-lth's fused optimizer builds its pointer table before the capture (none is
        copied from the host inside it) and the graph's memory pool holds no gradients. The same values: a
        gradient accumulated into zeros is the gradient (every step gives the same parameters one)."""
        if cfg.cuda_graph:
            optimizer.zero_grad(set_to_none=False)
        else:  # what zero_grad() does, without its profiling record and grouping (~40 us a step on a CPU)
            for p in trained:
                p.grad = None
        with autocast(cfg.precision, x_dev, cache_enabled=not cfg.cuda_graph):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        for m, fm in masked:
            if m.weight.grad is not None:
                m.weight.grad.mul_(fm)
        optimizer.step()
        if masked:
            with torch.no_grad():
                for m, fm in masked:
                    m.weight.mul_(fm)
        return loss

    graphed = _GraphedStep(one_step, _CudaGraphs()) if cfg.cuda_graph else None
    structure = _graph_structure(model) if graphed is not None else None
    timer = _StepTimer(torch.cuda.synchronize if x_dev.type == "cuda" else None, elapsed)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.iterations, initial=it, desc=desc or "train", dynamic_ncols=True, leave=False)
    model.train()
    try:
        with _stop_after_step(bool(checkpoint_path)) as stop:
            while it < cfg.iterations:
                timer.start()
                if stochastic:
                    torch.manual_seed(_step_seed(cfg.seed, it))
                x, y = train_data.batch(it, cfg.batch_size, cfg.seed)
                lr = lr_at(cfg, it)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if graphed is None:
                    loss = one_step(x, y)
                else:  # what the captured step bakes in besides its inputs: the lr, the shapes, the tensors
                    loss = graphed(x, y, (lr, tuple(x.shape), tuple(y.shape), structure))
                it += 1
                steps_timed += 1
                checkpoint_due = bool(checkpoint_path and checkpoint_every and it % checkpoint_every == 0
                                      and it < cfg.iterations)
                timer.stop(boundary=(it % cfg.eval_every == 0 or it == cfg.iterations or checkpoint_due
                                     or (capture_at == it and on_capture is not None) or callback is not None
                                     or stop[0] is not None))
                if capture_at == it and on_capture is not None:
                    on_capture(it, _copy_state(model))
                if it % cfg.eval_every == 0 or it == cfg.iterations:
                    do_eval(it)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{curve[-1]['test_acc']:.4f}")
                if bar is not None:
                    bar.update(1)
                if checkpoint_due:
                    do_checkpoint(it)
                if callback is not None:
                    callback(it, model)
                    if graphed is not None:  # a callback may have set masks or moved the model: capture again then
                        structure = _graph_structure(model)
                if stop[0] is not None:  # SIGINT/SIGTERM during this step: keep what it did, then stop
                    signum, stop[0] = stop[0], None
                    timer.stop(boundary=True)  # (the signal may have come after the step's own stop)
                    do_checkpoint(it)
                    raise TrainingInterrupted(signum, it, checkpoint_path)
    finally:
        if bar is not None:
            bar.close()

    es_it, es_acc = early_stop(curve)
    last = curve[-1]
    return dict(curve=curve, early_stop_iteration=es_it, early_stop_test_acc=es_acc,
                early_stop_on=early_stop_on(curve),
                test_acc=last["test_acc"], test_loss=last["test_loss"],
                train_acc=last.get("train_acc"), train_loss=last.get("train_loss"),
                iterations=cfg.iterations, start_iteration=start_iteration, steps=steps_timed,
                wall_time=wall_before + time.perf_counter() - t_start, step_time=timer.elapsed,
                time_per_step=timer.elapsed / max(steps_timed, 1),
                paths=layer_paths(model), backends=layer_backends(model), resumed_from=resumed_from,
                environments=environments, cuda_graph=None if graphed is None else graphed.summary())


class _CudaGraphs:
    """How :class:`_GraphedStep` warms up and captures: torch's recipe (the warm-up steps on a side stream, the
    capture on the graph's own stream, ``torch.cuda.graph``). Tests give a CPU stand-in with the same methods."""

    @staticmethod
    def check_device(device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and data on a CUDA device; they are on {device}")

    def warmup(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, the output tensor every replay rewrites). Nothing runs until the first replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out


class _GraphedStep:
    """The training step replayed as a CUDA graph (``TrainConfig.cuda_graph``): a LeNet-sized step on a GPU is
    mostly host time (Python, autograd, launch overhead), which a replay skips; the kernels are the same.

    Per ``key`` (what the captured step bakes in besides its inputs: the learning rate, the batch shapes, the
    model's tensors), :attr:`WARMUP` steps run eagerly (on a side stream, as torch requires before a capture; they
    also let Triton tune and compile, and create the optimizer's state), then the step is captured once with static
    input buffers, and every step with that key copies its batch into them and replays. A new key (a learning-rate
    milestone, a warm-up ramp, a smaller batch) starts over, so a ramp that changes the rate at every step runs
    eagerly until it ends. A capture that raises (an op that cannot be captured) is reported once with a warning
    and the run goes on eagerly: nothing of a failed capture has run, so the trajectory is intact."""

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], api):
        self.step, self.api = step, api
        self.key: Any = None
        self.replay: Callable[[], None] | None = None
        self.loss: torch.Tensor | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warm = 0
        self.captures = self.replays = self.eager = 0
        self.failed: BaseException | None = None

    def summary(self) -> dict:
        """What the graphs did in this run: captures, replayed steps, eager steps (warm-ups, steps after a failed
        capture) and the failure, if one."""
        return dict(captures=self.captures, replayed_steps=self.replays, eager_steps=self.eager,
                    failed=None if self.failed is None else f"{type(self.failed).__name__}: {self.failed}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, key) -> torch.Tensor:
        if self.failed is not None:
            self.eager += 1
            return self.step(x, y)
        if key != self.key:
            self.key, self.replay, self.loss, self.static, self.warm = key, None, None, None, 0
        if self.replay is None:
            if self.warm < self.WARMUP:
                self.warm += 1
                self.eager += 1
                return self.api.warmup(lambda: self.step(x, y))
            sx, sy = x.clone(), y.clone()
            try:
                self.replay, self.loss = self.api.capture(lambda: self.step(sx, sy))
            except Exception as e:  # noqa: BLE001 - reported, then the run goes on without graphs
                import warnings

                self.failed = e
                warnings.warn(f"cuda_graph: capturing the training step failed ({type(e).__name__}: {e}); "
                              "training goes on without CUDA graphs", RuntimeWarning, stacklevel=3)
                self.eager += 1
                return self.step(x, y)
            self.static = (sx, sy)
            self.captures += 1
        sx, sy = self.static
        sx.copy_(x)
        sy.copy_(y)
        self.replay()
        self.replays += 1
        return self.loss


def _graph_structure(model: nn.Module) -> tuple:
    """The identities and addresses of the model's parameters and buffers (masks, sparse formats): a captured step
    reads them by address, so a change (a new mask, a moved layer) calls for a new capture."""
    return tuple((id(t), t.data_ptr()) for t in (*model.parameters(), *model.buffers()))


class _StepTimer:
    """Time spent in training steps. On the CPU each step is timed alone. On a GPU the device runs behind the host,
    and waiting for it after every step (as this loop once did) adds the host's time to the device's instead of
    overlapping them, which decides a LeNet-sized step there. So steps are timed in stretches: from the first step
    of a stretch to the end of its last, after one ``synchronize``, and a stretch ends only where the loop does
    something else (an evaluation, a checkpoint, a capture, a callback, a stop). ``sync``: the device's
    synchronize, or None to time each step alone; ``elapsed``: seconds timed before (a resumed run's)."""

    def __init__(self, sync: Callable[[], None] | None, elapsed: float = 0.0):
        self.sync = sync
        self.elapsed = elapsed
        self._t0: float | None = None

    def start(self) -> None:
        if self.sync is None or self._t0 is None:
            self._t0 = time.perf_counter()

    def stop(self, boundary: bool) -> None:
        """After a step; ``boundary``: the loop does something other than the next step before it. A second call
        for the same step does nothing."""
        if self._t0 is not None and (self.sync is None or boundary):
            if self.sync is not None:
                self.sync()
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None


def _copy_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

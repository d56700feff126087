"""The host side of the two IMP examples and three developer tools: examples/imp_in_your_loop.py and
examples/imp_ddp.py (which batches each round trains on, the rewind between rounds, the checks of argument and
rank agreement, the torchrun / spawn entry), benchmarks/bench_ceilings.py (its CPU timer, the bandwidth and
FLOP/s arithmetic, the TF32 switch, defaults and file name), benchmarks/ab_train_cpu.py (what each arm's subprocess
runs, with which environment, and the table it prints) and benchmarks/compile_kernels.py (its ptxas parsing, the
row it makes of a compiled kernel, what it restores, the cases it compiles and its exit status).

Written after a mutation campaign on these files (session 37): each test kills mutants (small plausible bugs that
change what a user runs or reads) that the rest of the suite let through. Everything runs in-process on tiny
shapes: datasets, process groups, DDP, subprocesses, ptxas and the timers are stubbed where they would be slow or
need a GPU, so nothing is measured and every time asserted is a stub's.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import sparse_lth.kernels.optim  # noqa: F401 (imported under the interpreter, before compile_kernels pops it)
import sparse_lth.kernels.sparse_conv  # noqa: F401
import sparse_lth.kernels.sparse_linear  # noqa: F401
import sparse_lth.optim
from conftest import REPO
from test_benchmark_scripts import _load

from sparse_lth.pruner import MagnitudePruner

EXAMPLES = REPO / "examples"


def _load_example(name):
    """An example loaded as a module; imp_ddp's ``sys.path`` insert (for ``from imp_in_your_loop import``) is
    undone afterwards."""
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
    return mod


loop = _load_example("imp_in_your_loop")
ddp = _load_example("imp_ddp")
ceil = _load("bench_ceilings")
ab = _load("ab_train_cpu")


@pytest.fixture
def rng():
    """The global RNG, restored after the test (the examples seed it)."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


class _Stop(Exception):
    """Raised by a stub to stop a script once what the test looks at has happened."""


def _fake_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(x=torch.randn(n, 1, 28, 28, generator=g), y=torch.randint(0, 10, (n,), generator=g))


def _stub_datasets(monkeypatch, mod, n_train=50, n_test=30, log=None):
    """``mod.load_dataset`` replaced by tiny random MNIST-shaped sets (train and test differ); calls logged."""
    sets = {"train": _fake_data(n_train, 1), "test": _fake_data(n_test, 2)}

    def fake(name, split, root=None, device="cpu", limit=None):
        if log is not None:
            log.append(dict(name=name, split=split, root=root, device=torch.device(device), limit=limit))
        return sets[split]

    monkeypatch.setattr(mod, "load_dataset", fake)
    return sets


def _stub_clock(monkeypatch, mod, tick=0.5):
    """``mod.time.perf_counter`` advances ``tick`` seconds per call (the examples call it at a round's start and
    end only)."""
    t = iter(range(10 ** 6))
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: tick * next(t)))


def _parsed_args(monkeypatch):
    """Every ArgumentParser.parse_args result, in a list."""
    seen, real = [], argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        seen.append(ns)
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    return seen


@contextlib.contextmanager
def _deadline(seconds: float):
    """A TimeoutError after ``seconds`` (a loop that never ends fails instead of hanging the suite)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _forever(loader):
    while True:
        yield from loader


class _Spies:
    """MagnitudePruner and sparse_lth.optim.Adam wrapped: prunes counted, each optimizer's lr and its calls in
    order, and the model's dense weights when each optimizer (each round) is built."""

    def __init__(self, monkeypatch, mod):
        self.prunes, self.optimizers, self.start_weights = 0, [], []
        spies = self

        class Pruner(MagnitudePruner):
            def prune_and_rewind(self, rounds=1):
                spies.prunes += 1
                return super().prune_and_rewind(rounds)

            def set_rewind_point(self):
                spies.model = self.model
                return super().set_rewind_point()

        real_adam = sparse_lth.optim.Adam

        class Adam(real_adam):
            def __init__(self, params, **kw):
                super().__init__(params, **kw)
                self.events = []
                spies.optimizers.append((kw.get("lr"), self.events))
                spies.start_weights.append([m.dense_weight().detach().clone() for m in spies.model.modules()
                                            if hasattr(m, "set_mask")])

            def zero_grad(self, set_to_none=True):
                self.events.append("zero_grad")
                return super().zero_grad(set_to_none=set_to_none)

            def step(self, closure=None):
                self.events.append("step")
                return super().step(closure)

        monkeypatch.setattr(mod, "MagnitudePruner", Pruner)
        monkeypatch.setattr(sparse_lth.optim, "Adam", Adam)


# --------------------------------------------------------------------------------------- imp_in_your_loop.py
def test_accuracy_is_the_fraction_right_in_eval_mode_and_leaves_the_model_training():
    """``accuracy``: correct / all over every 1000-sample chunk, the model in eval mode while it predicts (a
    user's dropout or batch norm must not act) and back in training mode after."""
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.modes = []

        def forward(self, x):
            self.modes.append(self.training)
            return nn.functional.one_hot(x[:, 0].long(), 10).float()  # predicts the class in column 0

    x = torch.randint(0, 10, (2500, 3)).float()
    y = x[:, 0].long().clone()
    y[:700] = (y[:700] + 1) % 10  # 700 wrong, 1800 right
    model = Probe()
    assert loop.accuracy(model, x, y) == 1800 / 2500
    assert model.modes == [False, False, False] and model.training


def test_the_example_trains_each_round_on_the_seeded_loader_batches(monkeypatch, rng, threads):
    """Each round draws ``--iterations`` full batches of ``--batch-size`` from a shuffled loader seeded with
    ``--seed`` (a fresh pass at each round's start, epoch after epoch, the last short batch dropped), all from
    the ``--train-limit``ed training split; accuracy is measured on the test split on the device."""
    calls, seen = [], []
    sets = _stub_datasets(monkeypatch, loop, n_train=50, log=calls)
    real_model = loop.lenet300_100

    def model_with_probe():
        model = real_model()
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()) if m.training else None)
        return model

    monkeypatch.setattr(loop, "lenet300_100", model_with_probe)
    assert loop.main(["--data", "D", "--rounds", "2", "--iterations", "7", "--batch-size", "8", "--seed", "3",
                      "--train-limit", "50", "--device", "cpu"]) == 0
    assert calls == [dict(name="mnist", split="train", root="D", device=torch.device("cpu"), limit=50),
                     dict(name="mnist", split="test", root="D", device=torch.device("cpu"), limit=None)]
    train = sets["train"]
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=8, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(3))
    want = []
    for _ in range(3):  # 6 full batches an epoch: the 7th of a round starts the next epoch
        data = _forever(loader)
        want += [next(data)[0] for _ in range(7)]
    assert len(seen) == len(want) == 21
    assert all(torch.equal(a, b) for a, b in zip(seen, want))


def test_the_example_rewinds_to_theta0_with_a_new_optimizer_each_round(monkeypatch, rng, threads):
    """Rounds 0..R train with a fresh sparse_lth Adam at ``--lr`` (gradients zeroed before every step); between
    rounds (never after the last) the pruner prunes and rewinds: a round starts from θ0 on its surviving weights."""
    _stub_datasets(monkeypatch, loop)
    spies = _Spies(monkeypatch, loop)
    assert loop.main(["--rounds", "2", "--iterations", "3", "--batch-size", "8", "--lr", "0.01",
                      "--device", "cpu"]) == 0
    assert spies.prunes == 2
    assert [lr for lr, _ in spies.optimizers] == [0.01] * 3
    assert all(ev == ["zero_grad", "step"] * 3 for _, ev in spies.optimizers)
    theta0 = spies.start_weights[0]
    for later in spies.start_weights[1:]:
        for w0, w in zip(theta0, later):
            assert torch.equal(w, torch.where(w != 0, w0, 0))
            assert (w != 0).sum() < w0.numel()  # pruned


def test_the_example_table_and_csv(monkeypatch, tmp_path, capsys, rng, threads):
    """The row of a round: the weights remaining (3 decimals, the pruner's own figure), the test accuracy as a
    fraction in the CSV and a percent on screen, ms per training step (the round's time over --iterations) and
    one path letter per sparse layer."""
    _stub_datasets(monkeypatch, loop)
    _stub_clock(monkeypatch, loop, tick=0.5)
    monkeypatch.setattr(loop, "accuracy", lambda model, x, y: 0.25)
    out = tmp_path / "rounds.csv"
    assert loop.main(["--rounds", "1", "--iterations", "4", "--batch-size", "8", "--prune", "0.5",
                      "--device", "cpu", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    probe = MagnitudePruner(loop.lenet300_100(), fc=0.5)
    assert [float(r["percent_remaining"]) for r in rows] == pytest.approx(probe.schedule(1), abs=5e-4)
    assert [r["test_acc"] for r in rows] == ["0.25", "0.25"]
    assert [float(r["ms_per_step"]) for r in rows] == [125.0, 125.0]  # 0.5 s over 4 steps
    assert all(len(r["paths"].split("/")) == 3 and set(r["paths"].split("/")) <= {"d", "s"} for r in rows)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].split()[:4] == ["1", f"{probe.schedule(1)[1]:.2f}", "25.00", "125.00"]


def test_the_example_checks_its_arguments_and_runs_zero_rounds(monkeypatch, tmp_path, capsys, rng, threads):
    """--rounds 0 is the dense round alone (one row written); --iterations 0 is refused, and so is a CUDA device
    on a machine without one."""
    _stub_datasets(monkeypatch, loop)
    out = tmp_path / "r.csv"
    assert loop.main(["--rounds", "0", "--iterations", "2", "--batch-size", "8", "--device", "cpu",
                      "--csv", str(out)]) == 0
    assert [r["round"] for r in csv.DictReader(out.open())] == ["0"]
    with pytest.raises(SystemExit) as e:
        loop.main(["--iterations", "0", "--batch-size", "8", "--device", "cpu"])
    assert e.value.code == 2 and "--iterations >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            loop.main(["--device", "cuda", "--batch-size", "8"])
        assert e.value.code == 2 and "this machine has no CUDA GPU" in capsys.readouterr().err


def test_the_example_defaults_seed_and_threads(monkeypatch, rng, threads):
    """The docstring's run: 12 pruning rounds of 1,000 iterations, one CPU thread unless told; the global RNG is
    seeded with --seed before the model is made (its θ0 is the seed's)."""
    parsed = _parsed_args(monkeypatch)

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(loop, "load_dataset", stop)
    torch.set_num_threads(2)
    with pytest.raises(_Stop):
        loop.main(["--device", "cpu", "--seed", "7"])
    assert (parsed[-1].rounds, parsed[-1].iterations, parsed[-1].threads) == (12, 1000, 1)
    assert torch.get_num_threads() == 1 and torch.initial_seed() == 7


def test_the_example_refuses_a_training_set_smaller_than_a_batch(monkeypatch, rng, threads):
    """--train-limit below --batch-size leaves the loader (last short batch dropped) empty: an error, not a
    training loop that waits forever for a batch."""
    _stub_datasets(monkeypatch, loop, n_train=5)
    with _deadline(10), pytest.raises(SystemExit) as e:
        loop.main(["--train-limit", "5", "--batch-size", "8", "--device", "cpu", "--rounds", "0"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ imp_ddp.py
class _FakeDist:
    """torch.distributed for one rank of a two-rank world, in-process: the other rank holds the same tensors,
    or (in the rounds in ``differ``, counted by MIN reductions) the same plus 1e-6 in its first entry. Every call
    is logged."""
    ReduceOp = torch_dist.ReduceOp

    def __init__(self, differ=()):
        self.differ, self.rounds, self.calls = set(differ), -1, []

    def all_reduce(self, t, op):
        if op == self.ReduceOp.MIN:
            self.rounds += 1
        self.calls.append(("all_reduce", str(op)))
        other = t.clone()
        if self.rounds in self.differ:
            other[0] += 1e-6
        if op == self.ReduceOp.MIN:
            torch.minimum(t, other, out=t)
        elif op == self.ReduceOp.MAX:
            torch.maximum(t, other, out=t)
        else:
            raise AssertionError(op)

    def barrier(self):
        self.calls.append(("barrier",))

    def init_process_group(self, backend, rank, world_size):
        self.calls.append(("init", backend, rank, world_size))

    def destroy_process_group(self):
        self.calls.append(("destroy",))


def _fake_ddp(monkeypatch, seen=None):
    """DDP replaced by a pass-through wrapper that records the batches it is called on."""
    class Wrapper:
        def __init__(self, model, device_ids=None):
            self.model = model

        def parameters(self):
            return self.model.parameters()

        def __call__(self, x):
            if seen is not None:
                seen.append(x.clone())
            return self.model(x)

    monkeypatch.setattr(ddp, "DDP", Wrapper)


def test_ddp_ranks_agree_only_on_bitwise_equal_weights(monkeypatch):
    """same_on_every_rank: the elementwise MIN and MAX over ranks equal, i.e. every rank holds exactly the same
    parameters; one weight 1e-6 apart on another rank is a disagreement."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.5)  # 1e-6 apart is within allclose's tolerance here: equal must mean equal
    monkeypatch.setattr(ddp, "dist", _FakeDist())
    assert ddp.same_on_every_rank(model) is True
    fake = _FakeDist(differ={0})
    monkeypatch.setattr(ddp, "dist", fake)
    assert ddp.same_on_every_rank(model) is False
    assert [c[1] for c in fake.calls] == [str(torch_dist.ReduceOp.MIN), str(torch_dist.ReduceOp.MAX)]


def test_ddp_rank_trains_on_its_own_shard_epoch_after_epoch(monkeypatch, rng, threads, capsys):
    """Rank 1 of 2 trains each round on exactly --iterations batches of its DistributedSampler shard (shuffled
    with --seed, a new epoch number for every epoch of every round, short batches dropped), from the
    --train-limit / --test-limit-ed splits; only rank 0 prints; the process group's barrier ends the run."""
    calls, seen = [], []
    sets = _stub_datasets(monkeypatch, ddp, n_train=100, log=calls)
    fake = _FakeDist()
    monkeypatch.setattr(ddp, "dist", fake)
    _fake_ddp(monkeypatch, seen)
    args = ddp.parse(["--data", "D", "--rounds", "2", "--iterations", "8", "--batch-size", "8", "--seed", "5",
                      "--train-limit", "100", "--test-limit", "30", "--threads", "1", "--cpu"])
    rows = ddp.run(1, 2, args)
    assert calls == [dict(name="mnist", split="train", root="D", device=torch.device("cpu"), limit=100),
                     dict(name="mnist", split="test", root="D", device=torch.device("cpu"), limit=30)]
    train = sets["train"]
    sampler = DistributedSampler(TensorDataset(train.x, train.y), num_replicas=2, rank=1, shuffle=True, seed=5,
                                 drop_last=True)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=8, sampler=sampler, drop_last=True)
    want = []
    for r in range(3):  # 50 samples a rank: 6 full batches an epoch, so 8 steps take two epochs
        batches = []
        for epoch in range(2):
            sampler.set_epoch(r * 10_000 + epoch)
            batches += [x for x, _ in loader]
        want += batches[:8]
    assert len(seen) == len(want) == 24
    assert all(torch.equal(a, b) for a, b in zip(seen, want))
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["ranks_agree"] for r in rows)
    assert fake.calls[-1] == ("barrier",)
    assert capsys.readouterr().out == ""  # rank 1 prints nothing


def test_ddp_rank_zero_rows_and_rounds(monkeypatch, rng, threads, capsys):
    """Rank 0 prints a row per round; a row's ms per step is the round's time over --iterations; the rank prunes
    and rewinds between rounds only, each round with a fresh optimizer at --lr; threads and seed as asked."""
    _stub_datasets(monkeypatch, ddp)
    monkeypatch.setattr(ddp, "dist", _FakeDist())
    _fake_ddp(monkeypatch)
    _stub_clock(monkeypatch, ddp, tick=0.5)
    spies = _Spies(monkeypatch, ddp)
    torch.set_num_threads(2)
    args = ddp.parse(["--rounds", "2", "--iterations", "4", "--batch-size", "8", "--lr", "0.01", "--seed", "9",
                      "--threads", "1", "--cpu"])
    rows = ddp.run(0, 2, args)
    assert torch.get_num_threads() == 1 and torch.initial_seed() == 9
    assert [r["ms_per_step"] for r in rows] == [125.0] * 3
    assert spies.prunes == 2 and [lr for lr, _ in spies.optimizers] == [0.01] * 3
    assert all(ev == ["zero_grad", "step"] * 4 for _, ev in spies.optimizers)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("2 processes on cpu; ") and [ln.split()[0] for ln in printed[2:]] == ["0", "1", "2"]
    assert [ln.split()[3] for ln in printed[2:]] == ["125.00"] * 3


def test_ddp_a_round_whose_ranks_disagree_fails_the_rank(monkeypatch, rng, threads):
    """The agreement of every round is recorded; one round whose ranks hold different weights (here the last)
    makes the rank raise, after the process group is torn down."""
    _stub_datasets(monkeypatch, ddp)
    fake = _FakeDist(differ={1})
    monkeypatch.setattr(ddp, "dist", fake)
    _fake_ddp(monkeypatch)
    args = ddp.parse(["--rounds", "1", "--iterations", "2", "--batch-size", "8", "--cpu"])
    with pytest.raises(RuntimeError, match="rank 0: the ranks' weights differ"):
        ddp._main_of_rank(0, 2, args)
    assert fake.calls[0] == ("init", "gloo", 0, 2) and fake.calls[-1] == ("destroy",)


def test_ddp_refuses_a_shard_smaller_than_a_batch(monkeypatch, rng, threads):
    """A rank whose shard of the training set makes no full batch: an error, not a loop that waits forever."""
    _stub_datasets(monkeypatch, ddp, n_train=14)
    fake = _FakeDist()
    monkeypatch.setattr(ddp, "dist", fake)
    _fake_ddp(monkeypatch)
    with _deadline(10), pytest.raises(ValueError, match="7 training images per rank make no batch"):
        ddp.run(0, 2, ddp.parse(["--rounds", "0", "--iterations", "2", "--batch-size", "8", "--cpu"]))
    assert fake.calls == []  # before any collective: every rank raises alike


def test_ddp_backend_and_device_per_rank(monkeypatch):
    """nccl where there are GPUs (gloo with --cpu or without one); on GPUs, rank r uses GPU r mod the GPUs of its
    machine, made the current device."""
    fake, run = _FakeDist(), ddp.run
    monkeypatch.setattr(ddp, "dist", fake)
    monkeypatch.setattr(ddp, "run", lambda rank, world, args: [dict(ranks_agree=True)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ddp._main_of_rank(1, 4, ddp.parse([]))
    ddp._main_of_rank(1, 4, ddp.parse(["--cpu"]))
    assert [c for c in fake.calls if c[0] == "init"] == [("init", "nccl", 1, 4), ("init", "gloo", 1, 4)]

    devices = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(ddp, "load_dataset", stop)
    with pytest.raises(_Stop):
        run(3, 4, ddp.parse([]))
    assert devices == [torch.device("cuda:1")]
    devices.clear()
    with pytest.raises(_Stop):  # --cpu: no GPU touched even where there are some
        run(3, 4, ddp.parse(["--cpu"]))
    assert devices == []


def test_ddp_entry_spawns_procs_or_joins_torchrun(monkeypatch):
    """Not under torchrun: --procs processes spawned, each told the world size --procs and one free port. Under
    torchrun (RANK and WORLD_SIZE set): this process is the rank it is told, nothing spawned. --procs 0 is
    refused; 8 rounds by default."""
    spawned, ranks = [], []
    monkeypatch.setattr(ddp.mp, "spawn", lambda fn, args, nprocs: spawned.append((fn, args, nprocs)))
    monkeypatch.setattr(ddp, "_main_of_rank", lambda rank, world, args: ranks.append((rank, world)))
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "2")  # half a torchrun environment: not a rank
    assert ddp.main(["--procs", "3"]) == 0
    (fn, (world, args, port), nprocs), = spawned
    assert fn is ddp._spawned and world == 3 and nprocs == 3 and isinstance(port, int) and port > 0
    assert ranks == []
    monkeypatch.setenv("WORLD_SIZE", "5")
    assert ddp.main([]) == 0
    assert ranks == [(2, 5)] and len(spawned) == 1
    with pytest.raises(SystemExit):
        ddp.parse(["--procs", "0"])
    assert ddp.parse([]).rounds == 8


# ---------------------------------------------------------------------------------------------- bench_ceilings.py
@pytest.fixture
def tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_ceilings_cpu_timer_warms_up_then_takes_median_and_quantiles_in_ms(monkeypatch):
    """The CPU timer: one untimed call, then --repeats timed calls; median, 20 % and 80 % quantile in ms."""
    log, clock = [], iter([0.0, 0.004, 10.0, 10.001, 20.0, 20.003, 30.0, 30.002])

    def perf_counter():
        log.append("t")
        return next(clock)

    monkeypatch.setattr(ceil, "time", types.SimpleNamespace(perf_counter=perf_counter))
    med, p20, p80 = ceil._time(lambda: log.append("fn"), torch.device("cpu"), 4)
    assert log == ["fn"] + ["t", "fn", "t"] * 4
    assert (med, p20, p80) == pytest.approx((2.5, 1.0, 4.0))  # of 4, 1, 3 and 2 ms


def test_ceilings_cuda_timer_is_do_bench_median_and_quantiles(monkeypatch):
    """On CUDA the figures are triton's do_bench: median, 20 % and 80 % quantiles in that order (no GPU is
    needed to check the call: do_bench is stubbed, and nothing is timed on the host)."""
    import triton.testing
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        calls.append((warmup, rep))
        return [{0.5: 2.0, 0.2: 1.0, 0.8: 3.0}[q] for q in quantiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert ceil._time(lambda: pytest.fail("timed on the host"), torch.device("cuda"), 3) == (2.0, 1.0, 3.0)
    assert len(calls) == 1


def test_ceilings_rates_from_the_median(monkeypatch, tf32):
    """copy: read + written bytes of --copy-mib MiB over the median time, in GB (1e9 B)/s; matmul: 2 N^3
    operations over the median, in TFLOP/s; fp32 timed with TF32 off, and the process's TF32 switch restored."""
    timed = []

    def fake_time(fn, device, repeats):
        fn()
        timed.append(torch.backends.cuda.matmul.allow_tf32)
        return 2.0, 1.0, 3.0

    monkeypatch.setattr(ceil, "_time", fake_time)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = ceil.measure(torch.device("cpu"), copy_mib=1, matmul_n=8, repeats=3)
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert timed[1:] == [False]
    copy, mm = rows
    assert (copy["kind"], copy["size"], copy["median_ms"], copy["p20_ms"], copy["p80_ms"]) == ("copy", "1 MiB", 2.0,
                                                                                               1.0, 3.0)
    assert copy["rate"] == pytest.approx(2 * (1 << 20) / 2e-3 / 1e9)
    assert (mm["kind"], mm["dtype"], mm["size"]) == ("matmul", "float32", "8^3")
    assert mm["rate"] == pytest.approx(2 * 8 ** 3 / 2e-3 / 1e12)


def test_ceilings_main_defaults_file_and_columns(monkeypatch, tmp_path, capsys, threads):
    """On CPU by default: 256 MiB copies, 1024^3 products, 11 repeats, --threads set; rows to
    results/ceilings_<device slug>.csv (its folder made) with 5 significant digits, the commit in its column,
    and the median printed."""
    calls = []

    def fake_measure(device, copy_mib, matmul_n, repeats):
        calls.append((device.type, copy_mib, matmul_n, repeats))
        return [dict(kind="copy", dtype="float32", size="x", median_ms=2.0, p20_ms=1.0, p80_ms=3.0,
                     rate=1.23456789, unit="GB/s")]

    monkeypatch.setattr(ceil, "measure", fake_measure)
    monkeypatch.setattr(ceil, "device_name", lambda device: "cpu: Fake CPU 9000")
    monkeypatch.setattr(ceil, "git_commit", lambda: "abc123")
    monkeypatch.setattr(ceil, "RESULTS", tmp_path / "results")
    torch.set_num_threads(2)
    assert ceil.main(["--device", "cpu", "--threads", "1"]) == 0
    assert calls == [("cpu", 256, 1024, 11)] and torch.get_num_threads() == 1
    (row,) = list(csv.DictReader((tmp_path / "results" / "ceilings_cpu-fake-cpu-9000.csv").open()))
    assert (row["rate"], row["median_ms"], row["commit"], row["device"]) == ("1.2346", "2", "abc123",
                                                                             "cpu: Fake CPU 9000")
    assert "2.000 ms" in capsys.readouterr().out


def test_ceilings_refuses_zero_sizes(monkeypatch):
    """--copy-mib 0 or --matmul-n 0 is an error (it was taken for "the default" and measured 256 MiB / 1024^3)."""
    monkeypatch.setattr(ceil, "measure", lambda *a: pytest.fail("measured"))
    for flag in ("--copy-mib", "--matmul-n"):
        with pytest.raises(SystemExit) as e:
            ceil.main(["--device", "cpu", flag, "0"])
        assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ ab_train_cpu.py
def _checkout(path: Path) -> Path:
    (path / "sparse_lth").mkdir(parents=True)
    (path / "sparse_lth" / "train.py").write_text("")
    return path


def test_ab_run_once_trains_the_checkout_in_a_clean_process(monkeypatch, tmp_path):
    """One run: ``sparse-lth train`` of the checkout (its folder first on PYTHONPATH, and no checkout in the
    working directory, which ``python -c`` would put before it), --iterations steps evaluated only at the end,
    at the density and thread count asked (OMP_NUM_THREADS too); its JSON returned; a failed run stops the A/B
    with its stderr."""
    runs = []

    def fake_run(cmd, env, capture_output, text, cwd):
        argv = []
        cli = types.ModuleType("sparse_lth.cli")
        cli.main = lambda a: argv.extend(a) or 0
        monkeypatch.setitem(sys.modules, "sparse_lth.cli", cli)
        assert cmd[:2] == [sys.executable, "-c"]
        with pytest.raises(SystemExit):
            exec(cmd[2], {})
        runs.append(dict(argv=argv, env=env, cwd=cwd))
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(dict(time_per_step=0.5)))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    checkout = _checkout(tmp_path / "co")
    out = tmp_path / "m.json"
    assert ab.run_once(checkout, "/data", 7, 0.05, 3, out) == dict(time_per_step=0.5)
    (run,) = runs
    assert run["argv"] == ["train", "--data", "/data", "--iterations", "7", "--eval-every", "7", "--density",
                           "0.05", "--threads", "3", "--no-progress", "--out", str(out)]
    assert run["env"]["PYTHONPATH"] == str(checkout) and run["env"]["OMP_NUM_THREADS"] == "3"
    assert not (Path(run["cwd"]) / "sparse_lth").exists()

    monkeypatch.setattr(ab.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "boom"))
    with pytest.raises(SystemExit, match="boom"):
        ab.run_once(checkout, "/data", 7, 0.05, 3, tmp_path / "n.json")


def test_ab_main_rows_medians_ratio_and_sameness(monkeypatch, tmp_path, capsys):
    """Every run a row (its arm's checkout and commit, us per step from the run's seconds); per density the
    median of each arm, the ratio A / B of the medians, and whether the two arms' curves are equal; data from
    $SPARSE_LTH_DATA when --data is not given; the default file name says the threads."""
    a, b = _checkout(tmp_path / "A"), _checkout(tmp_path / "B")
    monkeypatch.setattr(ab, "commit_of", lambda c: {"A": "aaa", "B": "bbb"}[Path(c).name])
    monkeypatch.setattr(ab, "cpu_name", lambda: "Fake CPU")
    monkeypatch.setattr(ab, "cpu_id", lambda: "fake")
    monkeypatch.setattr(ab, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("SPARSE_LTH_DATA", "/env/data")
    secs = {("A", 1.0): [1e-4, 2e-4, 6e-4], ("B", 1.0): [4e-4, 5e-4, 1e-4],
            ("A", 0.05): [1e-4] * 3, ("B", 0.05): [1e-4] * 3}
    calls = []

    def fake_run_once(checkout, data, iterations, density, threads, out):
        calls.append((checkout.name, data, iterations, density, threads))
        t = secs[(checkout.name, density)].pop(0)
        curve = [1, 2] if (checkout.name, density) != ("B", 0.05) else [1, 3]
        return dict(curve=curve, time_per_step=t, test_acc=0.9)

    monkeypatch.setattr(ab, "run_once", fake_run_once)
    assert ab.main(["--a", str(a), "--b", str(b), "--densities", "1", "0.05", "--repeats", "3",
                    "--iterations", "5", "--threads", "2"]) == 0
    assert {c[1:] for c in calls} == {("/env/data", 5, 1.0, 2), ("/env/data", 5, 0.05, 2)}
    rows = list(csv.DictReader((tmp_path / "results" / "ab_train_cpu_fake-cpu-2-threads.csv").open()))
    assert len(rows) == 12
    assert all((r["checkout"], r["commit"]) == ((str(a.resolve()), "aaa") if r["arm"] == "a"
                                                else (str(b.resolve()), "bbb")) for r in rows)
    assert [float(r["us_per_step"]) for r in rows if r["arm"] == "a" and r["density"] == "1.0"] == [100, 200, 600]
    out = capsys.readouterr().out
    assert "density 1: A 200 us/step, B 400 us/step, A/B 0.500x; trained networks identical" in out
    assert "density 0.05: A 100 us/step, B 100 us/step, A/B 1.000x; trained networks DIFFERENT" in out


@pytest.mark.parametrize("bad", [["--a", "NOTACHECKOUT"], ["--iterations", "0"], ["--threads", "0"],
                                 ["--densities", "0"], ["--densities", "1.5"], []])
def test_ab_main_refuses_bad_arguments(monkeypatch, tmp_path, bad):
    """Not a checkout, no steps, no threads, a density outside (0, 1], or no data: an error before any run."""
    monkeypatch.setattr(ab, "run_once", lambda *a: pytest.fail("ran"))
    a = _checkout(tmp_path / "A")
    argv = ["--a", str(a), "--b", str(a), "--data", "/d"]
    if not bad:  # no --data, no $SPARSE_LTH_DATA
        monkeypatch.delenv("SPARSE_LTH_DATA", raising=False)
        argv = argv[:4]
    elif bad[0] == "--a":
        argv[1] = str(tmp_path / "elsewhere")
    else:
        argv += bad
    with pytest.raises(SystemExit) as e:
        ab.main(argv)
    assert e.value.code == 2


def test_ab_commit_of_names_head_and_tracked_changes(tmp_path):
    """A checkout's label: HEAD's 12-digit short hash, "-dirty" when a tracked file changed (an untracked file is
    not a change of the code under test)."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("x")
    assert ab.commit_of(tmp_path) == head[:12]
    (tmp_path / "f.py").write_text("a = 2\n")
    assert ab.commit_of(tmp_path) == head[:12] + "-dirty"


# --------------------------------------------------------------------------------------------- compile_kernels.py
@pytest.fixture
def ck(monkeypatch):
    """benchmarks/compile_kernels.py loaded in-process; the environment it changes on import is restored after
    (this process keeps running the kernels through the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSE_LTH_AUTOTUNE", "1")
    mod = _load("compile_kernels")
    yield mod


def test_compile_kernels_compiles_the_heuristic_configs_whatever_the_environment(ck):
    """Imported from an environment that interprets and autotunes (the test suite's), the script switches the
    interpreter off and autotuning off before Triton is imported by it."""
    assert "TRITON_INTERPRET" not in os.environ and os.environ["SPARSE_LTH_AUTOTUNE"] == "0"


PTXAS_V = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 24 bytes cumulative stack size, 1024 bytes smem, 400 bytes cmem[0]
"""


def test_compile_kernels_reads_ptxas_with_tritons_own_flags(ck, monkeypatch):
    """``ptxas -v`` runs with the register-allocation flags Triton's own cubin build passes, for the arch asked;
    registers, spill stores, spill loads, stack frame and static shared memory are read from what it says;
    a ptxas failure is an error, not a row of zeros."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend
    cmds = []

    def fake_run(cmd, capture_output, text, timeout):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", PTXAS_V)

    monkeypatch.setattr(ck.subprocess, "run", fake_run)
    assert ck._resources("// ptx", "sm_90a") == dict(registers=40, spill_stores=8, spill_loads=12, stack=24,
                                                     smem_static=1024)
    (cmd,) = cmds
    assert "--gpu-name=sm_90a" in cmd and "-v" in cmd
    src = inspect.getsource(CUDABackend.make_cubin)
    assert ("--regAllocOptLevel=2" in cmd) == ("--regAllocOptLevel=2" in src)
    monkeypatch.setattr(ck.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 255, "", "ptxas fatal: nope"))
    with pytest.raises(RuntimeError, match="ptxas failed: ptxas fatal: nope"):
        ck._resources("// ptx", "sm_90a")


PTX = """ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2];
ld.global.v2.b32 {%r5, %r6}, [%rd3];
ld.global.b32 %r7, [%rd4];
st.global.v4.b32 [%rd5], {%r1, %r2, %r3, %r4};
st.global.v2.b32 [%rd6], {%r5, %r6};
"""


def _fake_kernel(key="h1"):
    sig = {"x": "*fp32", "m": "*i8", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]], (3,): []}
    return types.SimpleNamespace(asm={"ptx": PTX}, hash=key, src=types.SimpleNamespace(signature=sig, attrs=attrs),
                                 metadata=types.SimpleNamespace(num_warps=4, num_stages=2, shared=0))


def test_compile_kernels_row_of_a_compiled_kernel(ck, monkeypatch):
    """A compiled binary's row: its constexprs (launch options apart), pointer element types and how many
    runtime arguments Triton specialized as 16-divisible, vector load/store counts from the PTX, ptxas's
    figures for sm_<arch>a on Hopper (sm_<arch> before); the same binary again adds its case, not a row."""
    arches = []
    monkeypatch.setattr(ck, "_resources", lambda ptx, arch: arches.append(arch) or dict(registers=40))
    rec = ck.Recorder(90)
    rec.case = "case 1"
    rec._record(types.SimpleNamespace(__name__="_k"), _fake_kernel(),
                dict(BLOCK=128, num_warps=4, num_stages=2, num_ctas=1))
    rec.case = "case 2"
    rec._record(types.SimpleNamespace(__name__="_k"), _fake_kernel(),
                dict(BLOCK=128, num_warps=4, num_stages=2, num_ctas=1))
    (row,) = rec.kernels.values()
    assert (row["kernel"], row["constexprs"], row["args"]) == ("_k", "BLOCK=128", "fp32 i8; 2/4 div16")
    assert (row["ld_v4"], row["ld_v2"], row["st_v4"], row["num_warps"], row["registers"]) == (2, 1, 1, 4, 40)
    assert row["cases"] == {"case 1", "case 2"} and arches == ["sm_90a"]
    rec80 = ck.Recorder(80)
    rec80._record(types.SimpleNamespace(__name__="_k"), _fake_kernel(), {})
    assert arches == ["sm_90a", "sm_80"]


def test_compile_kernels_recorder_restores_what_it_replaces(ck):
    """Inside the Recorder: launches compile for the target (JITFunction.run replaced, every device launchable,
    a stand-in driver naming the arch); after it, Triton and the launchers are as they were."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from sparse_lth.kernels import _triton
    before = (JITFunction.run, _triton.can_launch, driver._active)
    with ck.Recorder(80):
        assert JITFunction.run is not before[0] and _triton.can_launch(torch.device("cpu")) is True
        assert driver._active.get_current_target().arch == 80
    assert (JITFunction.run, _triton.can_launch, driver._active) == before


def _stub_launchers(monkeypatch, module, names, log, ret=None):
    for name in names:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: log.append((_n, a, k)) or ret)


def test_compile_kernels_linear_cases(ck, monkeypatch):
    """The linear cases: every dtype at every batch through the gather kernels, the slab kernels at a narrow
    (1) and a wide (4096) batch; with --all-configs every tuning configuration of each table reaches the
    kernel it tunes (spmm: forward and input gradient; sddmm: weight gradient; slab tables on the slab
    variant), its fields under their own names."""
    from sparse_lth.kernels import sparse_linear as L
    log = []
    _stub_launchers(monkeypatch, L, ["sparse_linear_forward", "sparse_linear_backward_input",
                                     "sparse_linear_backward_weight"], log)
    for _, run in ck.linear_cases(False):
        run()
    fwd = {(k["variant"], a[0].dtype, a[0].shape[0]) for n, a, k in log if n == "sparse_linear_forward"}
    assert {b for v, dt, b in fwd if v == "gather"} == {1, 60, 256, 4096}
    assert {(dt, b) for v, dt, b in fwd if v == "slab"} >= {(torch.float32, 1), (torch.float32, 4096),
                                                            (torch.bfloat16, 1), (torch.bfloat16, 4096)}
    log.clear()
    for _, run in ck.linear_cases(True):
        run()
    configs = {n: [(k["variant"], k["config"]) for m, a, k in log if m == n and k["config"] is not None]
               for n in ("sparse_linear_forward", "sparse_linear_backward_input", "sparse_linear_backward_weight")}
    for r, k, b, w in L._SPMM_CONFIGS:
        cfg = {"BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b, "num_warps": w}
        assert ("gather", cfg) in configs["sparse_linear_forward"]
        assert ("gather", cfg) in configs["sparse_linear_backward_input"]
    for k, b, w in L._SDDMM_CONFIGS:
        assert ("gather", {"BLOCK_NNZ": k, "BLOCK_B": b, "num_warps": w}) in configs["sparse_linear_backward_weight"]
    for table, fn in ((L._SPMM_SLAB_CONFIGS, "sparse_linear_forward"),
                      (L._SDDMM_SLAB_CONFIGS, "sparse_linear_backward_weight")):
        for p, r, k, b, w, occ in (c for by_size in table.values() for c in by_size):
            cfg = {"PANEL_STEP": p, "BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b, "num_warps": w, "OCC": occ}
            assert ("slab", cfg) in configs[fn]
    assert all(set(c) != {"BLOCK_NNZ", "BLOCK_B", "num_warps"} for _, c in configs["sparse_linear_forward"])


def test_compile_kernels_conv_and_optim_cases(ck, monkeypatch):
    """conv: each case's gradients use the forward's stride, padding and dilation, and the cases cover a
    stride, a zero padding and a dilation above 1; optim: "masked" cases pass masks and "compact" ones none,
    and AdamW (decoupled weight decay) and capturable Adam are compiled."""
    from sparse_lth.kernels import optim as O
    from sparse_lth.kernels import sparse_conv as C
    log = []
    _stub_launchers(monkeypatch, C, ["sparse_conv2d_forward", "sparse_conv2d_backward_input",
                                     "sparse_conv2d_backward_weight"], log, ret=torch.zeros(2, 6, 3, 3))
    geoms = set()
    for _, run in ck.conv_cases(False):
        log.clear()
        run()
        (_, fa, _), (_, ia, _), (_, wa, _) = log
        geometry = fa[5:8]  # stride, padding, dilation
        assert ia[5:8] == geometry and wa[4:7] == geometry and ia[3] == tuple(fa[0].shape)
        geoms.add(geometry)
    assert any(s[0] > 1 for s, p, d in geoms) and any(p[0] == 0 for s, p, d in geoms)
    assert any(d[0] > 1 for s, p, d in geoms)

    log = []
    _stub_launchers(monkeypatch, O, ["fused_sgd_", "fused_adam_"], log)
    for label, run in ck.optim_cases(False):
        log.clear()
        run()
        masks = [a[3] if n == "fused_sgd_" else a[5] for n, a, k in log]
        assert all(m is not None for m in masks) if "masked" in label else all(m is None for m in masks)
        adam = [k for n, a, k in log if n == "fused_adam_"]
        assert any(k.get("decoupled_weight_decay") and k["weight_decay"] > 0 for k in adam)
        assert any(k.get("capturable") for k in adam)


class _FakeRecorder:
    """compile_kernels.Recorder replaced: no Triton touched; the cases put their rows in ``kernels``."""
    made = []

    def __init__(self, arch):
        self.arch, self.kernels, self.case = arch, {}, ""
        _FakeRecorder.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _row(kernel):
    return dict(kernel=kernel, constexprs="B=1", args="fp32; 1/2 div16", num_warps=4, registers=32, spill_stores=0,
                spill_loads=0, stack=0, shared=0, ld_v4=1, ld_v2=0, st_v4=1)


def test_compile_kernels_main_reports_failures_and_keeps_going(ck, monkeypatch, tmp_path, capsys):
    """A case that fails to compile is reported (printed, and listed under "Failed" in the report) and the next
    cases still compile; the table is sorted by kernel; exit status 1. sm_90 by default, the report written
    to --out with its folder made."""
    def add(name):
        return lambda: _FakeRecorder.made[-1].kernels.setdefault(name, _row(name))

    def fail():
        raise RuntimeError("no\ncompile")

    monkeypatch.setattr(ck, "Recorder", _FakeRecorder)
    monkeypatch.setattr(ck, "FAMILIES", {"fam": lambda all_configs: [("first", add("_z")), ("broken", fail),
                                                                      ("last", add("_a"))]})
    out = tmp_path / "sub" / "r.md"
    assert ck.main(["--out", str(out)]) == 1
    assert _FakeRecorder.made[-1].arch == 90
    text = out.read_text()
    assert "2 distinct binaries, 1 failed cases" in text
    assert [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| _")] == ["_a", "_z"]
    assert "## Failed" in text and "- broken: RuntimeError: no" in text
    printed = capsys.readouterr().out
    assert "FAIL  broken: RuntimeError: compile" in printed and "ok    last" in printed


def test_compile_kernels_main_default_file_and_success(ck, monkeypatch, tmp_path):
    """All cases compiled: exit status 0, the report at results/compile_sm<arch>_triton-<version>.md."""
    import triton
    monkeypatch.setattr(ck, "Recorder", _FakeRecorder)
    monkeypatch.setattr(ck, "FAMILIES", {"fam": lambda all_configs: [("one", lambda: None)]})
    monkeypatch.setattr(ck, "RESULTS", tmp_path / "results")
    assert ck.main(["--arch", "80"]) == 0
    text = (tmp_path / "results" / f"compile_sm80_triton-{triton.__version__}.md").read_text()
    assert "0 distinct binaries, 0 failed cases" in text and "## Failed" not in text


def test_compile_kernels_main_reports_a_failure_with_a_blank_message(ck, monkeypatch, tmp_path, capsys):
    """An exception whose message is blank (only whitespace, or none) is reported by its type, and the next cases
    still compile (taking the message's last line used to raise IndexError and stop the run)."""
    def blank():
        raise RuntimeError("  \n ")

    def empty():
        raise ValueError()

    monkeypatch.setattr(ck, "Recorder", _FakeRecorder)
    monkeypatch.setattr(ck, "FAMILIES", {"fam": lambda all_configs: [("blank", blank), ("empty", empty),
                                                                      ("last", lambda: None)]})
    assert ck.main(["--out", str(tmp_path / "r.md")]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  blank: RuntimeError: \n" in printed and "FAIL  empty: ValueError: \n" in printed
    assert "ok    last" in printed
    text = (tmp_path / "r.md").read_text()
    assert "- blank: RuntimeError:" in text and "- empty: ValueError:" in text

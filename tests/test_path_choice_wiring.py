"""The per-layer path choice's less travelled paths: ``path="auto"`` on the Triton backend (faked here: the
backend property and the timing are stubbed), the CPU density rule's edges, what ``time_paths`` passes on, installs
and returns, which input and which gradients the timed steps get, the warm-up rounds, the median, the seeded
order, what ``choose_paths`` leaves alone (batch-norm statistics, a layer the forward never reached, a layer the
Triton kernels cannot run) and the batch and precision the drivers time with. Written after a mutation campaign on
the path choice (session 36, after the timed choice took the training's optimizer as a factory: 128 mutants of
layers.py's choice, train.py's optimizer factory and path records, and the IMP driver's and train's call sites;
31 real survivors): each test failed under a mutant the rest of the suite let through. No test depends on the speed
of this machine: the timings are stubbed, or come from busy-waiting probes with wide margins."""
import math
import time

import pytest
import torch
import torch.nn as nn
from conftest import require_shared_data, tiny_data

from sparse_lth.cli import main
from sparse_lth.imp import ImpHparams, run_imp
from sparse_lth.layers import (CUDA_SPARSE_MAX_DENSITY, SparseConv2d, SparseLinear, _SparseLayer, choose_paths,
                               parse_path_label, sparse_layers, sparsify)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(shape, live, seed=0):
    """A mask of ``shape`` with exactly ``live`` weights live."""
    n = math.prod(shape)
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:live]] = True
    return m.view(shape)


# ------------------------------------------------------------------------------------ optimizer factories
def test_choose_paths_refuses_an_optimizer_instance_even_where_no_layer_is_timed():
    """On the CPU without ``timed`` no layer is timed, so only choose_paths' own check sees the optimizer: an
    optimizer instance (not a factory) is refused there too, not first on the GPU machine."""
    model = sparsify(nn.Sequential(nn.Linear(6, 4)), masks={"0": _mask((4, 6), 12)})
    bad = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        choose_paths(model, torch.randn(3, 6), optimizer=bad)
    assert model[0].path_timings == {}


# ------------------------------------------------------------------------------------ "auto" on Triton (faked)
def _fake_triton(monkeypatch, chosen=("sparse", (False, False, True))):
    """Every sparse layer reports the Triton backend; its timed choice (``_time_paths``) is stubbed to return
    ``chosen`` and log the input shape it was asked for."""
    timed = []

    def fake_time_paths(self, input_shape, reps=10, optimizer=None):
        timed.append(tuple(input_shape))
        return chosen

    monkeypatch.setattr(_SparseLayer, "backend", property(lambda self: "triton"))
    monkeypatch.setattr(_SparseLayer, "_time_paths", fake_time_paths)
    return timed


def test_auto_on_triton_goes_by_density_until_an_input_is_seen_then_times(monkeypatch):
    """On CUDA, "auto" is sparse at or below 5 % (CUDA_SPARSE_MAX_DENSITY, not the CPU's 10 %) while the layer has
    seen no input; once it has, it times the paths and installs what the timing chose; a layer with every weight
    live stays dense untimed."""
    layer = SparseLinear(20, 20)  # made before the fake: every weight live, dense
    timed = _fake_triton(monkeypatch)
    assert CUDA_SPARSE_MAX_DENSITY == 0.05
    layer.set_mask(_mask((20, 20), 20))  # exactly 5 %
    assert layer.path_label == "sparse" and timed == []
    layer.set_mask(_mask((20, 20), 32))  # 8 %: sparse by the CPU's rule, not by CUDA's
    assert layer.path == "dense" and timed == []
    layer(torch.randn(4, 20))  # the dense path's forward: the layer has seen an input
    layer.set_mask(_mask((20, 20), 32))
    assert timed == [(4, 20)] and layer.path_label == "sparse/weight_grad:dense"
    layer.set_mask(torch.ones(20, 20, dtype=torch.bool))  # every weight live: dense, not timed
    assert layer.path == "dense" and timed == [(4, 20)]


def test_auto_on_triton_keeps_a_conv_its_kernels_cannot_run_dense(monkeypatch):
    """A grouped conv has no Triton sparse path: "auto" keeps it dense at any density, timed or not, and
    choose_paths neither times it nor fails on it."""
    conv = SparseConv2d(4, 4, 3, groups=2)
    timed = _fake_triton(monkeypatch, chosen=("sparse", (False, False, False)))
    conv.set_mask(_mask(conv.weight_shape, 1))
    assert conv.path == "dense"
    model = nn.Sequential(conv)
    assert choose_paths(model, torch.randn(2, 4, 6, 6), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)) == \
        {"0": "dense"}
    conv.set_mask(_mask(conv.weight_shape, 2))  # input seen now
    assert conv.path == "dense" and timed == [] and conv.path_timings == {}


def test_the_cpu_rule_keeps_a_fully_pruned_conv_it_has_no_rule_for_dense():
    """A conv the CPU rule does not cover (a first layer: 3 input channels) stays dense at any density, even with
    every weight pruned."""
    conv = SparseConv2d(3, 8, 3)
    for live in (0, 1):
        conv.set_mask(_mask(conv.weight_shape, live))
        assert conv.path == "dense", live


# ------------------------------------------------------------------------------------ time_paths
def _cost_model(costs, log):
    """A stand-in for _time_steps: each configuration's seconds from ``costs``; ``log`` gets (labels, reps, input
    requires_grad, input stride, input dtype) per timed batch."""
    def fake(probes, x, reps, optimizer=None):
        log.append((list(probes), reps, x.requires_grad, x.stride(), x.dtype))
        return {label: costs[label] for label in probes}
    return fake


COSTS = {"dense": 9.0, "sparse": 8.0, "sparse/forward:dense": 8.5, "sparse/input_grad:dense": 8.5,
         "sparse/weight_grad:dense": 7.0}


def test_time_paths_passes_reps_on_and_installs_and_returns_the_configuration_it_chose(monkeypatch):
    log = []
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(_cost_model(COSTS, log)))
    layer = SparseLinear(20, 10, backend="torch")
    layer.set_mask(_mask((10, 20), 60))
    assert layer.path_label == "dense"  # 30 %: dense by the CPU rule
    assert layer.time_paths((4, 20), reps=3) == "sparse/weight_grad:dense"
    assert layer.path_label == "sparse/weight_grad:dense" and layer.ops["weight_grad"] == "dense"
    assert [entry[1] for entry in log] == [3]  # the reps asked for, not the default 10


def test_the_timing_input_matches_the_layers_real_input(monkeypatch):
    """The probe input: batch-minor only for the shape the layer saw batch-minor (another shape: row-major);
    needing a gradient only where the layer's input did (a first layer's did not, batch-minor or not) or the shape
    is unknown; and a gradient is not timed just because a bias is frozen while the weight trains."""
    log = []
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(_cost_model(COSTS, log)))
    layer = SparseLinear(20, 10, backend="torch")
    layer.set_mask(_mask((10, 20), 20))
    layer(torch.randn(20, 6).t())  # a first layer fed a batch-minor input that needs no gradient
    layer.time_paths((6, 20))
    layer.time_paths((8, 20))  # a shape not seen
    assert [(rg, stride) for _, _, rg, stride, _ in log] == [(False, (1, 6)), (True, (20, 1))]
    log.clear()
    layer.bias.requires_grad_(False)  # the weight (values) still trains
    layer(torch.randn(6, 20))
    layer.time_paths((6, 20))
    assert [(rg, stride) for _, _, rg, stride, _ in log] == [(False, (20, 1))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_layer_is_timed_in_its_own_dtype(monkeypatch, dtype):
    log = []
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(_cost_model(COSTS, log)))
    layer = SparseLinear(20, 10, backend="torch", dtype=dtype)
    layer.set_mask(_mask((10, 20), 20))
    layer.time_paths((4, 20), reps=1)
    assert [entry[4] for entry in log] == [dtype]


# ------------------------------------------------------------------------------------ _time_steps
class _Scripted(nn.Module):
    """A probe whose n-th run (warm-up runs included) busy-waits ``costs[n]`` seconds (0 past the end); its weight
    gets a gradient, and ``order`` logs its name at each run."""

    def __init__(self, name, order, costs=()):
        super().__init__()
        self.name, self.order, self.costs, self.runs = name, order, list(costs), 0
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        self.order.append(self.name)
        cost = self.costs[self.runs] if self.runs < len(self.costs) else 0.0
        self.runs += 1
        end = time.perf_counter() + cost
        while time.perf_counter() < end:
            pass
        return x * self.weight


def test_time_steps_discards_exactly_two_warm_up_runs():
    """The two warm-up runs (the first builds the optimizer's state, caches, a lazy kernel) are not in the median:
    with one timed repeat, the figure is the third run's alone."""
    probe = _Scripted("a", [], costs=[0.1, 0.1])
    times = SparseLinear._time_steps({"a": probe}, torch.randn(3, requires_grad=True), reps=1)
    assert probe.runs == 3 and times["a"] < 0.04


def test_time_steps_reports_the_median_of_the_timed_runs():
    """Neither the fastest run (a lucky one) nor the mean (one burst of other work): the median."""
    probe = _Scripted("a", [], costs=[0.0, 0.0, 0.0, 0.02, 0.02, 0.02, 0.3])
    times = SparseLinear._time_steps({"a": probe}, torch.randn(3, requires_grad=True), reps=5)
    assert 0.02 <= times["a"] < 0.06


def test_time_steps_draws_the_same_order_every_call():
    """The random order is seeded: two timings of the same candidates run them in the same order."""
    orders = []
    for _ in range(2):
        order = []
        probes = {n: _Scripted(n, order) for n in "abc"}
        SparseLinear._time_steps(probes, torch.randn(3, requires_grad=True), reps=6)
        orders.append(order)
    assert len(orders[0]) == 3 * 8 and orders[0] == orders[1]


def test_time_steps_clears_each_gradient_before_the_next_step():
    """Each timed step starts with no gradient (as zero_grad leaves it): the optimizer sees one step's gradient
    every time, never a sum over the steps before."""
    grads = []

    class Recorder:
        def __init__(self, params):
            self.params = params

        def step(self):
            grads.append(self.params[0].grad.clone())

    probe = _Scripted("a", [])
    SparseLinear._time_steps({"a": probe}, torch.randn(3, requires_grad=True), reps=2, optimizer=Recorder)
    assert len(grads) == 4 and grads[0].abs().sum() > 0
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_a_frozen_layer_is_timed_without_building_an_optimizer():
    """A configuration with no trainable parameter gets no optimizer (torch's refuse an empty parameter list):
    a frozen layer is timed with the factory given, the forward and backward only."""
    built = []

    def factory(params):
        built.append(len(params))
        return torch.optim.SGD(params, lr=0.1)

    layer = SparseLinear(6, 3, backend="torch")
    layer.set_mask(_mask((3, 6), 9))
    layer.requires_grad_(False)
    assert layer.time_paths((2, 6), reps=1, optimizer=factory) in layer.path_timings
    assert built == [] and len(layer.path_timings) >= 2


# ------------------------------------------------------------------------------------ choose_paths
def test_choose_paths_on_triton_returns_the_path_and_times_with_the_input_seen(monkeypatch):
    """On the Triton backend choose_paths times each "auto" layer with the input it saw; it returns the path
    ("sparse"), the label with the ops run dense being ``layer.path_label``."""
    model = sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)),
                     masks={"0": _mask((8, 12), 30), "2": _mask((4, 8), 16)})
    timed = _fake_triton(monkeypatch)
    assert choose_paths(model, torch.randn(5, 12)) == {"0": "sparse", "2": "sparse"}
    assert timed == [(5, 12), (5, 8)]
    assert [layer.path_label for _, layer in sparse_layers(model)] == ["sparse/weight_grad:dense"] * 2


def test_choose_paths_leaves_batch_norm_statistics_alone():
    """The example batch runs in eval mode: a training model's batch norm does not take its statistics in."""
    model = nn.Sequential(SparseLinear(8, 6, mask=_mask((6, 8), 4)), nn.BatchNorm1d(6))
    model.train()
    choose_paths(model, torch.randn(4, 8) + 3.0)
    bn = model[1]
    assert bn.training and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(6)) and torch.equal(bn.running_var, torch.ones(6))


class _WithAnUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = SparseLinear(8, 4, mask=_mask((4, 8), 2))
        self.spare = SparseLinear(8, 4, mask=_mask((4, 8), 2))  # never called by forward

    def forward(self, x):
        return self.used(x)


def test_choose_paths_timed_skips_a_layer_the_example_input_never_reached(monkeypatch):
    log = []
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(_cost_model(COSTS, log)))
    model = _WithAnUnusedLayer()
    assert choose_paths(model, torch.randn(3, 8), timed=True) == {"used": "sparse", "spare": "sparse"}
    assert len(log) == 1 and model.spare.path_timings == {}  # the density rule: 2 of 32 live
    assert model.used.path_label == "sparse/weight_grad:dense"


def test_choose_paths_chooses_again_by_the_density_rule():
    """Without timing, each "auto" layer is put back on the path its rule gives, whatever it was put on since."""
    model = sparsify(nn.Sequential(nn.Linear(20, 10)), masks={"0": _mask((10, 20), 4)})
    model[0].restore_path("dense")
    assert choose_paths(model, torch.randn(3, 20)) == {"0": "sparse"} and model[0].path_label == "sparse"


def test_the_interpreter_backend_is_timed_only_when_asked(monkeypatch):
    """"auto" times by itself on the Triton backend (CUDA) only: a layer on the Triton interpreter (CPU) goes by
    the CPU rule unless ``timed=True``."""
    log = []
    monkeypatch.setattr(SparseLinear, "_time_steps", staticmethod(_cost_model(COSTS, log)))
    model = sparsify(nn.Sequential(nn.Linear(20, 10)), masks={"0": _mask((10, 20), 10)}, backend="interpret")
    assert model[0].backend == "interpret"
    assert choose_paths(model, torch.randn(3, 20)) == {"0": "sparse"}
    assert log == [] and model[0].path_label == "sparse"


def test_a_path_label_that_is_not_a_string_is_refused_clearly():
    for bad in (None, 3):
        with pytest.raises(ValueError, match="not a path label"):
            parse_path_label(bad)


# ------------------------------------------------------------------------------------ the drivers' call sites
def _spy_choose_paths(monkeypatch):
    import sparse_lth.layers as L
    calls, real = [], L.choose_paths

    def spy(model, x, timed=False, optimizer=None):
        calls.append(dict(batch=x.shape[0], autocast=(torch.is_autocast_enabled("cpu"),
                                                      torch.get_autocast_dtype("cpu")), timed=timed))
        return real(model, x, timed=timed, optimizer=optimizer)

    monkeypatch.setattr(L, "choose_paths", spy)
    return calls


def test_the_imp_driver_times_with_a_training_batch(tmp_path, monkeypatch):
    """The layers are timed on a batch of the round's batch size (the shape they train on), not on a smaller one."""
    calls = _spy_choose_paths(monkeypatch)
    hp = ImpHparams(model="lenet300_100", width=0.1, optimizer="adam", lr=3e-3, batch_size=24, iterations="2it",
                    eval_every=2, train_eval_size=64, rounds=1, layer_impl="sparse", path="auto", timed_paths=True)
    run_imp(hp, str(tmp_path), progress=False, data=tiny_data(240, 120))
    assert [c["batch"] for c in calls] == [24, 24] and all(c["timed"] for c in calls)


def test_train_times_paths_with_a_training_batch_in_its_precision(tmp_path, monkeypatch):
    """train --timed-paths: timed on a batch of --batch-size, under the autocast it trains in (--precision bf16)."""
    calls = _spy_choose_paths(monkeypatch)
    out = tmp_path / "m.json"
    assert main(["train", "--data", str(require_shared_data()), "--data-limit", "300", "--test-limit", "100",
                 "--no-progress", "--iterations", "2", "--eval-every", "2", "--density", "0.05", "--timed-paths",
                 "--batch-size", "20", "--precision", "bf16", "--out", str(out)]) == 0
    assert calls == [dict(batch=20, autocast=(True, torch.bfloat16), timed=True)]


def test_choose_training_paths_times_where_the_choice_is_timed_with_the_trainings_batch_and_optimizer(monkeypatch):
    """The drivers' one call: on the CPU without ``timed`` the density rule stands (nothing timed, False); with it,
    choose_paths gets the training's first batch in the seed's order, under its autocast, and a factory of the
    training's optimizer (its class and settings), and it returns True."""
    import sparse_lth.layers as L
    from sparse_lth.train import TrainConfig, choose_training_paths

    calls, real = [], L.choose_paths

    def spy(model, x, timed=False, optimizer=None):
        calls.append(dict(x=x.clone(), timed=timed, optimizer=optimizer,
                          autocast=(torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        return real(model, x, timed=timed, optimizer=optimizer)

    monkeypatch.setattr(L, "choose_paths", spy)
    model = sparsify(nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.ReLU(), nn.Linear(12, 10)))
    train_data, _ = tiny_data(60, 10)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=16, precision="bf16",
                      optimizer_impl="sparse_lth")
    assert choose_training_paths(model, train_data, cfg, 3, torch.device("cpu")) is False and calls == []
    assert choose_training_paths(model, train_data, cfg, 3, torch.device("cpu"), timed=True) is True
    (call,) = calls
    assert call["timed"] and call["autocast"] == (True, torch.bfloat16)
    assert torch.equal(call["x"], train_data.batch(0, 16, 3)[0])
    assert not torch.equal(call["x"], train_data.batch(0, 16, 4)[0])  # the seed given, not another
    opt = call["optimizer"]([nn.Parameter(torch.zeros(3))])
    assert type(opt).__module__.startswith("sparse_lth") and type(opt).__name__ == "SGD"
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9

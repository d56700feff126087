"""The training loop: lr schedule, determinism, exact resume from a checkpoint, the rewind hook, masks kept, early
stopping, bad configurations, and LeNet-300-100 on real MNIST with the sparse layers."""
import dataclasses
import os
import signal
import sys

import pytest
import torch

from conftest import require_shared_data, tiny_data
from sparse_lth.data import load_dataset
from sparse_lth.imp import apply_masks, prunable_layers, random_masks
from sparse_lth.layers import sparsify
from sparse_lth.models import build_model
from sparse_lth.train import TrainConfig, TrainingInterrupted, early_stop, evaluate, lr_at, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mnist_root() -> str:
    return str(require_shared_data())  # the tests fail, never skip, when the data is missing


pytestmark = pytest.mark.usefixtures("one_thread")




def tiny_model(kind="sparse", density=0.5, path="sparse", dropout=0.0, seed=0):
    model = build_model("lenet300_100", width=0.1, dropout=dropout, seed=seed)
    if kind == "sparse":
        model = sparsify(model, path=path)
    shapes = {n: tuple((m.dense_weight() if hasattr(m, "dense_weight") else m.weight).shape)
              for n, m in prunable_layers(model)}
    g = torch.Generator().manual_seed(seed + 1)
    masks = random_masks(shapes, {n: int(density * torch.Size(s).numel()) for n, s in shapes.items()}, g)
    apply_masks(model, masks, path=path if kind == "sparse" else None)
    return model, masks


def cfg(**kw):
    base = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=16, iterations=24,
                eval_every=6, train_eval_size=50, eval_batch_size=64, seed=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule():
    c = cfg(lr=0.1, milestones=(10, 20), gamma=0.1, warmup=4)
    assert [round(lr_at(c, i), 10) for i in (0, 1, 3, 9, 10, 19, 20, 30)] == \
        [0.025, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert lr_at(cfg(lr=0.3), 1000) == 0.3


@pytest.mark.parametrize("optimizer_impl", ["sparse_lth", "torch"])
def test_each_step_runs_at_the_schedules_learning_rate(optimizer_impl):
    """The rate each optimizer step used, read at the step (test_lr_schedule checks lr_at alone, and the curve's
    lr field is computed again from it: a schedule applied one step early passed every test). Also resumed."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    tr, te = tiny_data()
    c = cfg(lr=0.1, milestones=(10, 20), gamma=0.1, warmup=4, optimizer_impl=optimizer_impl)
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        train(tiny_model()[0], tr, te, c)
        assert seen == [lr_at(c, i) for i in range(24)] and seen[3] == 0.1 and seen[10] == pytest.approx(0.01)
        seen.clear()
        train(tiny_model()[0], tr, te, c, start_iteration=15)
        assert seen == [lr_at(c, i) for i in range(15, 24)]
    finally:
        handle.remove()


@pytest.mark.parametrize("kw,msg", [(dict(optimizer="rmsprop"), "optimizer"), (dict(lr=0.0), "lr"),
                                    (dict(momentum=1.0), "momentum"), (dict(batch_size=0), "batch_size"),
                                    (dict(milestones=(20, 10)), "milestones"), (dict(iterations=0), "iterations"),
                                    (dict(milestones=(10, 10)), "milestones"), (dict(seed=2 ** 64), "seed must be an integer"),
                                    (dict(optimizer="adam", nesterov=True), "nesterov"),
                                    (dict(optimizer_impl="jax"), "optimizer_impl"),
                                    # non-finite values (NaN passed `< 0` and failed later, after the run folder
                                    # was written; inf trained to chance accuracy)
                                    (dict(weight_decay=float("nan")), "weight_decay"),
                                    (dict(weight_decay=float("inf")), "weight_decay"),
                                    (dict(gamma=float("inf")), "gamma"), (dict(gamma=float("nan")), "gamma")])
def test_bad_config_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw)


def test_bad_train_arguments():
    tr, te = tiny_data()
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="start_iteration"):
        train(model, tr, te, cfg(), start_iteration=24)
    with pytest.raises(ValueError, match="capture_at"):
        train(model, tr, te, cfg(), capture_at=30)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            train(model.cuda(), tr, te, cfg())


@pytest.mark.parametrize("kind,optimizer", [("sparse", "sgd"), ("masked", "adam"), ("masked", "adamw")])
def test_deterministic_masks_kept_and_metrics(kind, optimizer):
    tr, te = tiny_data()
    outs, finals = [], []
    for _ in range(2):
        model, masks = tiny_model(kind)
        out = train(model, tr, te, cfg(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3))
        outs.append(out)
        finals.append(weights(model))
        for n, m in prunable_layers(model):
            w = m.dense_weight() if hasattr(m, "dense_weight") else m.weight
            assert (w[~masks[n]] == 0).all(), "a pruned weight moved"
            assert (w[masks[n]] != 0).float().mean() > 0.99
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    a, b = outs
    assert a["curve"] == b["curve"]
    assert [r["iteration"] for r in a["curve"]] == [0, 6, 12, 18, 24]
    assert a["curve"][-1]["test_acc"] > a["curve"][0]["test_acc"]  # it learns
    assert (a["early_stop_iteration"], a["early_stop_test_acc"]) == early_stop(a["curve"])
    assert a["steps"] == 24 and a["time_per_step"] > 0 and a["wall_time"] >= a["step_time"]
    assert set(a["paths"].values()) == ({"sparse"} if kind == "sparse" else {"masked"})


def test_early_stop_picks_min_test_loss():
    curve = [dict(iteration=0, test_loss=2.0, test_acc=0.1), dict(iteration=5, test_loss=0.5, test_acc=0.8),
             dict(iteration=10, test_loss=0.7, test_acc=0.85), dict(iteration=15, test_loss=0.5, test_acc=0.9)]
    assert early_stop(curve) == (5, 0.8)
    with pytest.raises(ValueError):
        early_stop([])


def test_early_stop_goes_by_the_validation_loss_when_there_is_one():
    curve = [dict(iteration=0, test_loss=2.0, test_acc=0.1, val_loss=2.1), dict(iteration=5, test_loss=0.5,
             test_acc=0.8, val_loss=0.9), dict(iteration=10, test_loss=0.7, test_acc=0.85, val_loss=0.6)]
    assert early_stop(curve) == (10, 0.85)  # the test accuracy where the validation loss is least


def test_training_with_a_validation_set():
    """``val_data``: every evaluation also on the held-out examples, and the early stop where their loss is least
    (the test accuracy there); without it, at the least test loss as before."""
    tr, te = tiny_data(240, 120)
    tr, val = tr.split_off(60)
    model, _ = tiny_model("sparse")
    out = train(model, tr, te, cfg(iterations=24, eval_every=4), val_data=val)
    assert all({"val_loss", "val_acc"} <= set(r) for r in out["curve"]) and out["early_stop_on"] == "val"
    best = min(out["curve"], key=lambda r: (r["val_loss"], r["iteration"]))
    assert (out["early_stop_iteration"], out["early_stop_test_acc"]) == (best["iteration"], best["test_acc"])
    model, _ = tiny_model("sparse")
    plain = train(model, tr, te, cfg(iterations=24, eval_every=4))
    assert plain["early_stop_on"] == "test" and "val_loss" not in plain["curve"][0]
    # the same training (the validation set is only looked at): the same test curve
    assert [r["test_loss"] for r in plain["curve"]] == [r["test_loss"] for r in out["curve"]]


@pytest.mark.parametrize("kind", ["sparse", "masked"])
def test_bf16_precision_runs_the_forward_passes_under_autocast(kind):
    """precision="bf16": the layers compute in bf16 (training and evaluation), the weights and their updates stay
    fp32, pruned weights stay zero, and it learns; fp32 is the default and leaves the layers in fp32."""
    tr, te = tiny_data()
    dtypes = {}
    for precision in ("fp32", "bf16"):
        model, masks = tiny_model(kind)
        first = next(m for n, m in prunable_layers(model))
        seen = []
        first.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
        out = train(model, tr, te, cfg(iterations=24, eval_every=6, precision=precision))
        dtypes[precision] = set(seen)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert out["curve"][-1]["test_acc"] > out["curve"][0]["test_acc"] + 0.3  # it learns
        for n, m in prunable_layers(model):
            w = m.dense_weight() if hasattr(m, "dense_weight") else m.weight
            assert (w[~masks[n]] == 0).all()
    assert dtypes["fp32"] == {(True, torch.float32), (False, torch.float32)}
    assert dtypes["bf16"] == {(True, torch.bfloat16), (False, torch.bfloat16)}
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        cfg(precision="fp16")


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    """A checkpoint whose configuration lacks a field added since (precision, say) resumes as if it had the
    field's default, rather than being refused as another training configuration."""
    tr, te = tiny_data()
    c = cfg(optimizer="adam", lr=3e-3, iterations=12, eval_every=4)
    ref_model, _ = tiny_model("sparse")
    ref = train(ref_model, tr, te, c)
    ck = str(tmp_path / "ck.pt")
    train_until_killed(tiny_model("sparse")[0], tr, te, c, ck, 6)
    old = torch.load(ck, weights_only=False)
    del old["config"]["precision"]
    torch.save(old, ck)
    out = train(tiny_model("sparse")[0], tr, te, c, checkpoint_path=ck)
    assert out["resumed_from"] == 4 and out["curve"] == ref["curve"]
    with pytest.raises(ValueError, match="different training configuration"):  # another value still is refused
        train(tiny_model("sparse")[0], tr, te, dataclasses.replace(c, precision="bf16"), checkpoint_path=ck)


def train_until_killed(model, tr, te, c, ck, kill_at, **kw):
    """Train with a checkpoint every 4 iterations into ``ck``, stopped by an exception at iteration ``kill_at``."""
    class Stop(Exception):
        pass

    def stop_at(it, model):
        if it == kill_at:
            raise Stop
    with pytest.raises(Stop):
        train(model, tr, te, c, checkpoint_path=ck, checkpoint_every=4, callback=stop_at, **kw)


@pytest.mark.parametrize("kind", ["sparse", "masked"])
def test_resume_from_checkpoint_is_exact(tmp_path, kind):
    tr, te = tiny_data()
    c = cfg(optimizer="adam", lr=3e-3, iterations=20, eval_every=5)
    ref_model, _ = tiny_model(kind, dropout=0.3)
    ref = train(ref_model, tr, te, c, start_iteration=2)

    ck = str(tmp_path / "ck.pt")
    train_until_killed(tiny_model(kind, dropout=0.3)[0], tr, te, c, ck, 11, start_iteration=2)
    assert torch.load(ck, weights_only=False)["iteration"] == 8
    model2, _ = tiny_model(kind, dropout=0.3, seed=1)  # different weights and masks: all come from the checkpoint
    its = []
    # the progress bar is display only: a run killed with it off resumes with it on (and the other way round)
    out = train(model2, tr, te, dataclasses.replace(c, progress=not c.progress), start_iteration=2,
                checkpoint_path=ck, checkpoint_every=4, callback=lambda it, m: its.append(it))
    assert its[0] == 9 and out["resumed_from"] == 8
    assert out["curve"] == ref["curve"]
    assert out["environments"] == ref["environments"]  # resumed under the same numerics: one stretch, from 2
    assert [e["from_iteration"] for e in out["environments"]] == [2]
    w_ref, w = weights(ref_model), weights(model2)
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    with pytest.raises(ValueError, match="different training configuration"):
        train(model2, tr, te, dataclasses.replace(c, lr=1e-3), start_iteration=2, checkpoint_path=ck)


def test_a_resume_under_other_numerics_warns_and_is_recorded(tmp_path):
    """A checkpoint written under one CPU instruction set (say) and resumed under another: the run goes on, warns
    that its numbers will not match, and the result lists both stretches."""
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=4)
    ck = str(tmp_path / "ck.pt")
    train_until_killed(tiny_model("sparse")[0], tr, te, c, ck, 9)
    state = torch.load(ck, weights_only=False)
    here = state["environments"][0]
    assert here["from_iteration"] == 0 and here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    state["environments"] = [{**here, "cpu_capability": "OTHER"}]
    torch.save(state, ck)
    with pytest.warns(RuntimeWarning, match="resumed at iteration 8 .* under other numerics than before: "
                                            "cpu_capability OTHER -> "):
        out = train(tiny_model("sparse")[0], tr, te, c, checkpoint_path=ck, checkpoint_every=4)
    assert [e["from_iteration"] for e in out["environments"]] == [0, 8]
    assert [e["cpu_capability"] for e in out["environments"]] == ["OTHER", here["cpu_capability"]]


def test_capture_hook_gives_weights_at_iteration_k():
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=12)
    got = {}
    model, _ = tiny_model("sparse")
    train(model, tr, te, c, capture_at=5, on_capture=lambda k, s: got.setdefault(k, s))
    ref_model, _ = tiny_model("sparse")
    train(ref_model, tr, te, dataclasses.replace(c, iterations=5, eval_every=5))
    ref = weights(ref_model)
    assert list(got) == [5]
    assert all(torch.equal(got[5][k], ref[k]) for k in ref)
    got0 = {}
    m0, _ = tiny_model("sparse")
    before = weights(m0)
    train(m0, tr, te, c, capture_at=0, on_capture=lambda k, s: got0.setdefault(k, s))
    assert all(torch.equal(got0[0][k], before[k]) for k in before)


def test_evaluate_counts_every_sample():
    tr, te = tiny_data(n_test=37)
    model, _ = tiny_model("masked")
    loss, acc = evaluate(model, te.eval_batches(10))
    with torch.no_grad():
        out = model(te.x)
    assert acc == pytest.approx((out.argmax(1) == te.y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, te.y).item(), rel=1e-5)


def test_lenet_mnist_one_epoch_sparse_layers():
    """LeNet-300-100, Adam 1.2e-3, batch 60, 1000 iterations (one epoch) with sparse layers: >= 95% test acc."""
    root = mnist_root()
    tr = load_dataset("mnist", "train", root=root)
    te = load_dataset("mnist", "test", root=root)
    model = sparsify(build_model("lenet300_100", seed=0), path="auto")
    out = train(model, tr, te, TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=1000,
                                           eval_every=1000, train_eval_size=0, seed=0, progress=False))
    assert out["test_acc"] >= 0.95, out["test_acc"]
    assert set(out["paths"]) == {"fc1", "fc2", "fc3"}
    # the same at 20% density on the sparse path (random masks: no ticket, still well above 90%)
    model = sparsify(build_model("lenet300_100", seed=0), path="sparse")
    shapes = {n: tuple(m.mask.shape) for n, m in prunable_layers(model)}
    g = torch.Generator().manual_seed(0)
    apply_masks(model, random_masks(shapes, {n: int(0.2 * torch.Size(s).numel()) for n, s in shapes.items()}, g),
                path="sparse")
    out = train(model, tr, te, TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=300,
                                           eval_every=300, train_eval_size=0, seed=0, progress=False))
    assert set(out["paths"].values()) == {"sparse"} and out["test_acc"] >= 0.88, out["test_acc"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_there(tmp_path, sig, default_sigint):
    """Ctrl-C or SIGTERM in the middle of training: the step under way finishes, a checkpoint is written at that
    iteration (not at the last periodic one), and the resume from it is exact."""
    tr, te = tiny_data()
    c = cfg(optimizer="adam", lr=3e-3, iterations=20, eval_every=5)
    ref_model, _ = tiny_model("sparse", dropout=0.3)
    ref = train(ref_model, tr, te, c)
    before = signal.getsignal(sig)

    def kill_at_11(it, m):
        if it == 11:
            os.kill(os.getpid(), sig)  # delivered here, between bytecodes, like a real one

    ck = str(tmp_path / "ck.pt")
    model, _ = tiny_model("sparse", dropout=0.3)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {sig.name} at iteration 11, checkpoint written") as e:
        train(model, tr, te, c, checkpoint_path=ck, checkpoint_every=4, callback=kill_at_11)
    assert e.value.signum == sig and e.value.iteration == 11 and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(sig) == before  # the handlers are put back
    assert torch.load(ck, weights_only=False)["iteration"] == 11  # not 8, the last periodic checkpoint
    its = []
    model2, _ = tiny_model("sparse", dropout=0.3, seed=1)
    out = train(model2, tr, te, c, checkpoint_path=ck, checkpoint_every=4, callback=lambda it, m: its.append(it))
    assert its[0] == 12 and out["resumed_from"] == 11 and out["curve"] == ref["curve"]
    w_ref, w = weights(ref_model), weights(model2)
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)


@pytest.fixture
def default_sigint():
    """Ctrl-C as in an interactive Python: KeyboardInterrupt. A test suite started in the background (`pytest &`
    from a script) inherits SIGINT ignored, and then a Ctrl-C that is not deferred does nothing at all."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_with_stderr_gone_still_ends_the_step_with_a_checkpoint(tmp_path, default_sigint, monkeypatch):
    """Ctrl-C on `sparse-lth imp ... | tee log` ends tee first: the handler's message then meets a closed pipe. The
    BrokenPipeError it raised escaped in the middle of the step, and no checkpoint was written there."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    tr, te = tiny_data()

    def kill_at_7(it, m):
        if it == 7:
            monkeypatch.setattr(sys, "stderr", Gone())
            os.kill(os.getpid(), signal.SIGINT)

    ck = str(tmp_path / "ck.pt")
    model, _ = tiny_model()
    with pytest.raises(TrainingInterrupted, match="at iteration 7, checkpoint written"):
        train(model, tr, te, cfg(iterations=12), checkpoint_path=ck, checkpoint_every=5, callback=kill_at_7)
    monkeypatch.undo()
    assert torch.load(ck, weights_only=False)["iteration"] == 7


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A run started with SIGINT ignored (`cmd &` from a script, where Ctrl-C at the terminal is not meant for it;
    Python itself leaves it ignored) is not stopped by one: training took it over and stopped."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tr, te = tiny_data()
        model, _ = tiny_model()
        out = train(model, tr, te, cfg(iterations=12), checkpoint_path=str(tmp_path / "ck.pt"), checkpoint_every=5,
                    callback=lambda it, m: os.kill(os.getpid(), signal.SIGINT) if it == 7 else None)
        assert out["curve"][-1]["iteration"] == 12
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_stops_at_once_and_without_a_checkpoint_nothing_is_deferred(tmp_path, default_sigint):
    tr, te = tiny_data()
    c = cfg(iterations=20)
    ck = str(tmp_path / "ck.pt")

    def twice_at_6(it, m):
        if it == 6:
            # the impatient: no waiting for the end of the step (raise_signal runs the handler before it returns)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            raise AssertionError("not reached: the second Ctrl-C raises at once")

    with pytest.raises(KeyboardInterrupt) as e:
        train(tiny_model()[0], tr, te, c, checkpoint_path=ck, checkpoint_every=4, callback=twice_at_6)
    assert not isinstance(e.value, TrainingInterrupted)
    assert torch.load(ck, weights_only=False)["iteration"] == 4  # the last periodic checkpoint only
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    steps = []

    def once_at_3(it, m):  # no checkpoint to keep the work: Ctrl-C acts as it always did, at once
        steps.append(it)
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as e:
        train(tiny_model()[0], tr, te, c, callback=once_at_3)
    assert not isinstance(e.value, TrainingInterrupted) and steps == [1, 2, 3]


def test_gpu_steps_are_timed_in_stretches_between_evaluations(tmp_path, monkeypatch):
    """On a GPU the loop waits for the device only where it does something other than the next step (an
    evaluation, a checkpoint, the rewind capture, a callback): waiting after every step would add the host's time
    to the device's. Here the CPU run gets a counting stand-in for torch.cuda.synchronize: 30 steps, evaluations
    every 10, a checkpoint every 15 and the capture at 4 wait 5 times (4, 10, 15, 20, 30), and the run is the same
    as one timed step by step."""
    import sparse_lth.train as T

    tr, te = tiny_data()
    c = cfg(optimizer="adam", lr=3e-3, iterations=30, eval_every=10)
    ref_model, _ = tiny_model("sparse")
    ref = train(ref_model, tr, te, c, checkpoint_path=str(tmp_path / "ref.pt"), checkpoint_every=15,
                capture_at=4, on_capture=lambda k, s: None)
    waits = []

    class CountingTimer(T._StepTimer):
        def __init__(self, sync, elapsed=0.0):
            assert sync is None  # (CPU data)
            super().__init__(lambda: waits.append(len(waits)), elapsed)

    monkeypatch.setattr(T, "_StepTimer", CountingTimer)
    model, _ = tiny_model("sparse")
    captured = []
    out = train(model, tr, te, c, checkpoint_path=str(tmp_path / "ck.pt"), checkpoint_every=15, capture_at=4,
                on_capture=lambda k, s: captured.append(k))
    assert len(waits) == 5 and captured == [4]
    assert out["steps"] == 30 and 0 < out["step_time"] <= out["wall_time"]
    assert out["curve"] == ref["curve"]
    w_ref, w = weights(ref_model), weights(model)
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    waits.clear()
    train(tiny_model("sparse")[0], tr, te, c, callback=lambda it, m: None)  # a callback after every step
    assert len(waits) == 30


# ---------------------------------------------------------------------------------------------------- CUDA graphs
class StandInGraphs:
    """The CPU stand-in for train()'s CUDA-graph API: a "capture" runs nothing, and each replay runs the step on
    the static input buffers and writes the loss into the static output, as a graph replay would. What it checks is
    train()'s bookkeeping around the graphs (warm-up, static buffers, re-capture on a new key, the fallback)."""

    warmups = captures = replays = 0
    fail = False

    @staticmethod
    def check_device(device):
        pass

    def warmup(self, fn):
        type(self).warmups += 1
        return fn()

    def capture(self, fn):
        if type(self).fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        type(self).captures += 1
        static = torch.zeros(())

        def replay():
            type(self).replays += 1
            static.copy_(fn())

        return replay, static


@pytest.fixture
def stand_in_graphs(monkeypatch):
    import sparse_lth.train as T

    StandInGraphs.warmups = StandInGraphs.captures = StandInGraphs.replays = 0
    StandInGraphs.fail = False
    monkeypatch.setattr(T, "_CudaGraphs", StandInGraphs)
    return StandInGraphs


@pytest.mark.parametrize("impl,optimizer", [("torch", "sgd"), ("sparse_lth", "adam")])
def test_cuda_graph_steps_are_the_eager_steps(stand_in_graphs, impl, optimizer):
    """cuda_graph=True with the stand-in: per learning rate (a milestone at 10 starts over), 3 eager warm-up steps,
    one capture, replays for the rest; each step reads its own batch through the static buffers (the result is
    the eager run's, bit for bit), and a callback (which may change the model) costs no capture when it does not."""
    tr, te = tiny_data()
    kw = dict(optimizer=optimizer, optimizer_impl=impl, lr=0.05 if optimizer == "sgd" else 3e-3,
              milestones=(10,), iterations=20, eval_every=7)
    ref_model, _ = tiny_model()
    ref = train(ref_model, tr, te, cfg(**kw))
    model, _ = tiny_model()
    seen = []
    out = train(model, tr, te, cfg(cuda_graph=True, **kw), callback=lambda it, m: seen.append(it))
    assert seen == list(range(1, 21))
    assert (stand_in_graphs.warmups, stand_in_graphs.captures, stand_in_graphs.replays) == (6, 2, 14)
    assert out["cuda_graph"] == dict(captures=2, replayed_steps=14, eager_steps=6, failed=None)
    assert ref["cuda_graph"] is None
    for k, v in weights(ref_model).items():
        assert torch.equal(weights(model)[k], v), k
    assert out["curve"] == ref["curve"]


def test_cuda_graph_capture_failure_falls_back_to_eager(stand_in_graphs):
    """A capture that raises is reported once and the run goes on eagerly, on the eager trajectory."""
    stand_in_graphs.fail = True
    tr, te = tiny_data()
    ref_model, _ = tiny_model()
    train(ref_model, tr, te, cfg(iterations=12))
    model, _ = tiny_model()
    with pytest.warns(RuntimeWarning, match="cuda_graph: capturing the training step failed"):
        out = train(model, tr, te, cfg(iterations=12, cuda_graph=True))
    assert stand_in_graphs.warmups == 3 and stand_in_graphs.replays == 0
    assert out["cuda_graph"] == dict(captures=0, replayed_steps=0, eager_steps=12,
                                     failed="RuntimeError: operation not permitted when stream is capturing")
    for k, v in weights(ref_model).items():
        assert torch.equal(weights(model)[k], v), k


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("graph_first", [True, False])
def test_cuda_graph_resumes_a_run_without_graphs(stand_in_graphs, tmp_path, monkeypatch, optimizer, graph_first):
    """cuda_graph says how a run executes, not what it computes: a checkpoint written with it resumes without it,
    and the other way round. Adam's ``capturable`` (which ``load_state_dict`` would take from the checkpoint's
    groups) follows the resumed run: a run checkpointed eagerly and resumed with graphs has capturable step counts
    (on the host, every capture would fail on a GPU), and the other way round."""
    import sparse_lth.train as T

    built = []
    real = T.build_optimizer
    monkeypatch.setattr(T, "build_optimizer", lambda model, c: built.append(real(model, c)) or built[-1])
    kw = dict(optimizer=optimizer, optimizer_impl="sparse_lth") if optimizer == "adam" else {}
    if optimizer == "adam":
        kw.update(lr=3e-3, momentum=0.0)
    tr, te = tiny_data()
    ck = str(tmp_path / "ck.pt")
    model, _ = tiny_model()
    with pytest.raises(RuntimeError, match="stop"):
        train(model, tr, te, cfg(cuda_graph=graph_first, **kw), checkpoint_path=ck, checkpoint_every=6,
              callback=lambda it, m: (_ for _ in ()).throw(RuntimeError("stop")) if it == 13 else None)
    model, _ = tiny_model()
    out = train(model, tr, te, cfg(cuda_graph=not graph_first, **kw), checkpoint_path=ck, checkpoint_every=6)
    assert out["resumed_from"] == 12
    if optimizer == "adam":
        assert [g["capturable"] for g in built[-1].param_groups] == [not graph_first]
        assert all(isinstance(st["step"], torch.Tensor) and float(st["step"]) == 24
                   for st in built[-1].state.values())
    ref_model, _ = tiny_model()
    train(ref_model, tr, te, cfg(**kw))
    for k, v in weights(ref_model).items():
        if optimizer == "sgd":
            assert torch.equal(weights(model)[k], v), k
        else:  # capturable Adam's bias corrections: exp2(step * log2(beta)) instead of beta ** step
            torch.testing.assert_close(weights(model)[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("impl,optimizer,dropout,precision", [
    ("torch", "sgd", 0.0, "fp32"), ("torch", "adam", 0.0, "fp32"), ("sparse_lth", "adam", 0.0, "fp32"),
    ("sparse_lth", "sgd", 0.1, "fp32"), ("sparse_lth", "adam", 0.0, "bf16")])
def test_cuda_graph_training_on_a_gpu(impl, optimizer, dropout, precision):
    """On a GPU: train() with the step captured as a real CUDA graph (sparse layers, a learning-rate milestone that
    makes it capture twice; with dropout, re-seeded before every step as train() does, which a replay must honour;
    under bf16 autocast, whose cast cache is off in graph mode) against the same run without graphs: the same
    trajectory to rounding
    (torch's capturable Adam computes its bias corrections in fp32 on the device; sparse-lth's reads them in fp64,
    as the eager step). On the CPU: refused with a clear error (there is nothing to capture)."""
    tr, te = tiny_data()
    kw = dict(optimizer=optimizer, optimizer_impl=impl, lr=0.05 if optimizer == "sgd" else 3e-3,
              milestones=(12,), iterations=30, eval_every=10, precision=precision)
    if not torch.cuda.is_available():
        model, _ = tiny_model()
        with pytest.raises(ValueError, match="cuda_graph=True needs the model and data on a CUDA device"):
            train(model, tr, te, cfg(cuda_graph=True, **kw))
        return
    tr, te = tr.to("cuda"), te.to("cuda")
    runs = {}
    for graph in (False, True):
        model, _ = tiny_model(dropout=dropout)
        model = model.cuda()
        out = train(model, tr, te, cfg(cuda_graph=graph, **kw))
        runs[graph] = (weights(model), out)
    # per learning rate (a milestone at 12): 3 warm-up steps, then captured and replayed; no fallback
    assert runs[True][1]["cuda_graph"] == dict(captures=2, replayed_steps=24, eager_steps=6, failed=None)
    for k, v in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(runs[True][1]["curve"], runs[False][1]["curve"]):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_cuda_graph_capture_copies_no_optimizer_table(stand_in_graphs, monkeypatch):
    """With sparse-lth's fused optimizer on the kernel path (here the interpreter), the gradients keep their
    addresses from the warm-up steps on (zeroed in place), so the captured step finds every table in the cache:
    nothing is copied from the host inside a capture."""
    import sparse_lth.kernels.optim as K
    import sparse_lth.train as T

    monkeypatch.setenv("SPARSE_LTH_BACKEND", "interpret")
    built = []
    real = K._to_device
    monkeypatch.setattr(K, "_to_device", lambda host, device: built.append(K._capturing(device)) or real(host, device))

    class Capturing(StandInGraphs):
        def capture(self, fn):  # the step as a capture traces it (on the CPU it also runs: no trajectory check)
            monkeypatch.setattr(K, "_capturing", lambda device: True)
            try:
                fn()
            finally:
                monkeypatch.setattr(K, "_capturing", lambda device: False)
            return super().capture(fn)

    monkeypatch.setattr(T, "_CudaGraphs", Capturing)
    tr, te = tiny_data()
    model, _ = tiny_model()
    train(model, tr, te, cfg(optimizer="adam", lr=3e-3, optimizer_impl="sparse_lth", iterations=8, eval_every=8,
                             cuda_graph=True))
    assert Capturing.captures == 1 and Capturing.replays == 5  # steps 4-8; 1-3 warm up
    assert built and True not in built  # tables were built, in the warm-up steps only


def test_early_stop_goes_by_the_test_loss_unless_every_row_has_a_validation_loss():
    """one row without val_loss (a held-out set added on resume, say): the test loss decides."""
    from sparse_lth.train import early_stop, early_stop_on
    curve = [dict(iteration=0, test_loss=2.0, test_acc=0.1), dict(iteration=5, test_loss=0.5, test_acc=0.8,
             val_loss=0.9), dict(iteration=10, test_loss=0.7, test_acc=0.85, val_loss=0.6)]
    assert early_stop_on(curve) == "test"
    assert early_stop(curve) == (5, 0.8)


def test_each_step_draws_its_own_dropout_seed():
    """the per-step seed depends on the iteration (else every step draws the same dropout masks)."""
    from sparse_lth.train import _step_seed
    assert len({_step_seed(3, i) for i in range(1000)}) == 1000
    assert _step_seed(3, 7) != _step_seed(4, 7)


def test_a_curve_row_records_the_learning_rate_of_the_last_step():
    """the row at iteration i holds lr_at(i - 1), the rate the step that ended there ran at."""
    tr, te = tiny_data()
    model, _ = tiny_model()
    out = train(model, tr, te, cfg(lr=0.05, milestones=(6,), gamma=0.1, iterations=12, eval_every=6))
    assert [(r["iteration"], round(r["lr"], 8)) for r in out["curve"]] == [(0, 0.05), (6, 0.05), (12, 0.005)]


def test_subset_batches_cover_exactly_the_first_n_examples():
    """the train-accuracy batches hold every one of the first n examples, once, in order."""
    from sparse_lth.train import subset_batches
    tr, _ = tiny_data()
    got = list(subset_batches(tr, 50, 16))
    assert [b[0].shape[0] for b in got] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[0] for b in got]), tr.x[:50])
    assert torch.equal(torch.cat([b[1] for b in got]), tr.y[:50])


def test_a_checkpoint_of_another_start_iteration_is_refused(tmp_path):
    """a checkpoint written by a run started at iteration 2 is not resumed by one started at 0."""
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=4)
    ck = str(tmp_path / "ck.pt")
    train_until_killed(tiny_model()[0], tr, te, c, ck, 6, start_iteration=2)
    with pytest.raises(ValueError, match="different training configuration"):
        train(tiny_model()[0], tr, te, c, start_iteration=0, checkpoint_path=ck)


def test_a_resumed_run_counts_the_wall_time_before_the_resume(tmp_path):
    """wall_time sums over resumes: the checkpoint's wall time is part of it."""
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=4)
    ck = str(tmp_path / "ck.pt")
    train_until_killed(tiny_model()[0], tr, te, c, ck, 6)
    saved = torch.load(ck, weights_only=False)
    saved["wall"] = 1000.0
    torch.save(saved, ck)
    out = train(tiny_model()[0], tr, te, c, checkpoint_path=ck)
    assert out["resumed_from"] == 4 and out["wall_time"] >= 1000.0


def test_a_callback_that_replaces_a_buffer_gets_a_new_capture(monkeypatch):
    """the captured step reads buffers (masks) by address: a callback that replaces one (same values,
    new tensor) makes train() capture again."""
    import sparse_lth.train as Tr
    StandInGraphs.warmups = StandInGraphs.captures = StandInGraphs.replays = 0
    StandInGraphs.fail = False
    monkeypatch.setattr(Tr, "_CudaGraphs", StandInGraphs)
    tr, te = tiny_data()
    model, _ = tiny_model("masked")

    def cb(it, m):
        if it == 5:
            for _, mod in Tr.plain_masked_modules(m):
                mod.weight_mask = mod.weight_mask.clone()

    out = Tr.train(model, tr, te, cfg(cuda_graph=True, iterations=20, eval_every=7), callback=cb)
    assert out["cuda_graph"]["captures"] == 2 and out["cuda_graph"]["eager_steps"] == 6

"""The training loop's and the datasets' less travelled paths: the evaluation schedule after a late start, a
forced early-stop criterion, which data each metric is measured on, dropout and augmentation draws per step, what a
resumed run counts and restores, configuration checks, the idx and CIFAR files' checks. Written after a mutation
campaign on sparse_lth/train.py and data.py (session 34: 79 mutants, 35 real survivors): each test failed under a
mutant the rest of the suite let through."""
import dataclasses
import gzip
import signal

import numpy as np
import pytest
import torch

from conftest import tiny_data
from test_train import cfg, tiny_model
from sparse_lth import optim as sl_optim
from sparse_lth.data import DeviceDataset, load_dataset
from sparse_lth.imp import prunable_layers
from sparse_lth.train import TrainConfig, build_optimizer, early_stop, evaluate, optimizer_factory, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    pass


def run_until(model, tr, te, c, ck, kill_at, **kw):
    """Train with a checkpoint every 4 iterations into ``ck``, stopped by an exception at iteration ``kill_at``."""
    def stop_at(it, m):
        if it == kill_at:
            raise Stop
    with pytest.raises(Stop):
        train(model, tr, te, c, checkpoint_path=ck, checkpoint_every=4, callback=stop_at, **kw)


# ------------------------------------------------------------------------------------------------ eval schedule
def test_the_end_is_evaluated_when_iterations_is_not_a_multiple_of_eval_every():
    tr, te = tiny_data()
    out = train(tiny_model()[0], tr, te, cfg(iterations=10, eval_every=4))
    assert [r["iteration"] for r in out["curve"]] == [0, 4, 8, 10]


def test_evaluations_fall_on_multiples_of_eval_every_after_a_late_start():
    tr, te = tiny_data()
    out = train(tiny_model()[0], tr, te, cfg(iterations=12, eval_every=4), start_iteration=2)
    assert [r["iteration"] for r in out["curve"]] == [2, 4, 8, 12]


def test_early_stop_honours_a_forced_criterion():
    curve = [dict(iteration=0, test_loss=2.0, test_acc=0.1, val_loss=0.5),
             dict(iteration=5, test_loss=0.5, test_acc=0.8, val_loss=0.9)]
    assert early_stop(curve) == (0, 0.1)
    assert early_stop(curve, on="test") == (5, 0.8)
    assert early_stop(curve, on="val") == (0, 0.1)


# ---------------------------------------------------------------------------------------------- metrics measured
def test_curve_metrics_are_measured_on_the_right_data():
    """train_* on the first train_eval_size training examples, val_* on the held-out set, test_* on the test set;
    the returned final figures are the last evaluation's."""
    tr, te = tiny_data(240, 120)
    tr, val = tr.split_off(60)
    model, _ = tiny_model("masked")
    out = train(model, tr, te, cfg(iterations=12, eval_every=6, train_eval_size=50), val_data=val)
    last = out["curve"][-1]
    model.eval()
    with torch.no_grad():
        for split, (x, y) in dict(train=(tr.x[:50], tr.y[:50]), val=(val.x, val.y), test=(te.x, te.y)).items():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
            assert last[f"{split}_loss"] == pytest.approx(loss, rel=1e-5), split
            assert last[f"{split}_acc"] == pytest.approx(acc), split
            if split != "val":
                assert out[f"{split}_loss"] == pytest.approx(loss, rel=1e-5), split
                assert out[f"{split}_acc"] == pytest.approx(acc), split


def test_evaluate_puts_an_eval_mode_model_back_in_eval_mode():
    tr, te = tiny_data()
    model, _ = tiny_model("masked", dropout=0.3)
    model.eval()
    evaluate(model, te.eval_batches(64))
    assert not model.training
    model.train()
    evaluate(model, te.eval_batches(64))
    assert model.training


def test_plain_masked_layers_are_masked_before_the_first_evaluation_and_step():
    """a model whose pruned weights are not zero (weights loaded after the mask was set, a rewind): the loop
    masks them first, so the evaluation at iteration 0 is that of the masked network."""
    tr, te = tiny_data()
    model, masks = tiny_model("masked")
    ref, _ = tiny_model("masked")
    with torch.no_grad():
        for n, m in prunable_layers(model):
            m.weight.add_((~masks[n]).float())  # pruned weights made non-zero
    expect = evaluate(ref, te.eval_batches(64))
    out = train(model, tr, te, cfg(iterations=2, eval_every=2))
    assert (out["curve"][0]["test_loss"], out["curve"][0]["test_acc"]) == pytest.approx(expect, rel=1e-6)


# -------------------------------------------------------------------------------------------------- dropout seeds
def test_dropout_draws_a_new_mask_at_every_step():
    tr, te = tiny_data()
    model, _ = tiny_model(dropout=0.5)
    drop = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    seen = []  # (dropped: a non-zero input zeroed, kept: a non-zero output) at each training call
    drop.register_forward_hook(
        lambda m, i, o: seen.append(((o == 0) & (i[0] != 0), o != 0)) if m.training else None)
    train(model, tr, te, cfg(iterations=4, eval_every=4))
    assert len(seen) == 8  # (the module runs after each of the two hidden layers)
    firsts = seen[0::2]
    # an element dropped at step 0 is kept at each later step somewhere: not the same mask every step
    assert all((firsts[0][0] & kept).any() for _, kept in firsts[1:])


# --------------------------------------------------------------------------------------------------- checkpoints
def test_a_resumed_run_counts_every_step_and_its_step_time(tmp_path):
    """steps and step_time of a resumed round cover the steps before the checkpoint too; a checkpoint records
    the step time and wall time so far (and keeps the wall time of an earlier stretch)."""
    tr, te = tiny_data()
    c = cfg(iterations=20, eval_every=5)
    ck = str(tmp_path / "ck.pt")
    run_until(tiny_model()[0], tr, te, c, ck, 10, start_iteration=2)
    saved = torch.load(ck, weights_only=False)
    assert saved["iteration"] == 8 and 0 < saved["elapsed"] <= saved["wall"]
    saved["elapsed"], saved["wall"] = 500.0, 1000.0
    torch.save(saved, ck)
    run_until(tiny_model()[0], tr, te, c, ck, 14, start_iteration=2)  # resumed at 8, checkpoint at 12
    saved = torch.load(ck, weights_only=False)
    assert saved["iteration"] == 12 and saved["elapsed"] > 500.0 and saved["wall"] > 1000.0
    out = train(tiny_model()[0], tr, te, c, start_iteration=2, checkpoint_path=ck)
    assert out["resumed_from"] == 12 and out["steps"] == 18
    assert out["step_time"] > 500.0 and out["wall_time"] > 1000.0
    assert out["time_per_step"] == pytest.approx(out["step_time"] / 18)


def test_a_resume_puts_the_layers_back_on_the_checkpoints_path(tmp_path):
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=4)
    ref_model, _ = tiny_model(path="sparse")
    ref = train(ref_model, tr, te, c)
    ck = str(tmp_path / "ck.pt")
    run_until(tiny_model(path="sparse")[0], tr, te, c, ck, 6)
    model, _ = tiny_model(path="dense")  # built on another path: the checkpoint's path wins
    out = train(model, tr, te, c, checkpoint_path=ck)
    assert set(out["paths"].values()) == {"sparse"} and out["curve"] == ref["curve"]


def test_the_progress_bar_of_a_resumed_run_starts_at_the_resumed_iteration(tmp_path, monkeypatch):
    import tqdm.auto

    made = []

    class Bar:
        def __init__(self, total, initial=0, **kw):
            made.append(dict(total=total, initial=initial))
            self.n = initial

        def update(self, k):
            self.n += k

        def set_postfix(self, **kw):
            pass

        def close(self):
            made[-1]["n"] = self.n

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    tr, te = tiny_data()
    c = cfg(iterations=12, eval_every=4, progress=True)
    ck = str(tmp_path / "ck.pt")
    run_until(tiny_model()[0], tr, te, c, ck, 6)
    train(tiny_model()[0], tr, te, c, checkpoint_path=ck)
    assert made[-1] == dict(total=12, initial=4, n=12)


# ------------------------------------------------------------------------------------------- configuration checks
def test_the_optimizer_is_the_one_configured():
    model, _ = tiny_model("masked")
    for impl in ("torch", "sparse_lth"):
        opt = build_optimizer(model, cfg(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3,
                                         optimizer_impl=impl))
        g = opt.param_groups[0]
        assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (0.9, True, 1e-3)
        for name in ("adam", "adamw"):
            opt = build_optimizer(model, cfg(optimizer=name, lr=3e-3, momentum=0.0, weight_decay=1e-2,
                                             optimizer_impl=impl))
            assert type(opt).__name__ == {"adam": "Adam", "adamw": "AdamW"}[name]
            assert opt.param_groups[0]["weight_decay"] == 1e-2 and opt.param_groups[0]["lr"] == 3e-3


def test_the_optimizer_factory_builds_the_configured_optimizer_over_the_parameters_given():
    """optimizer_factory(cfg) is what the timed path choice steps with: build_optimizer over a list of parameters
    (a timed copy's), the trainable ones only, with the configuration's optimizer and settings."""
    model, _ = tiny_model("masked")
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    params = [*model.parameters(), frozen]
    for impl, ns in (("torch", torch.optim), ("sparse_lth", sl_optim)):
        c = cfg(optimizer="adamw", lr=3e-3, weight_decay=1e-2, optimizer_impl=impl)
        opt = optimizer_factory(c)(params)
        assert type(opt) is ns.AdamW and opt.param_groups[0]["params"] == list(model.parameters())
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (3e-3, 1e-2)
        same = build_optimizer(model, c)
        assert type(same) is type(opt) and same.param_groups[0]["params"] == opt.param_groups[0]["params"]
    opt = optimizer_factory(cfg(optimizer="sgd", momentum=0.9, lr=0.05))(iter(model.parameters()))  # an iterator
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    # a CUDA-graph run's Adam is capturable; the timing's is the eager one (torch's capturable Adam refuses the CPU)
    c = cfg(optimizer="adam", cuda_graph=True)
    assert build_optimizer(model, c).param_groups[0]["capturable"] is True
    opt = optimizer_factory(c)(list(model.parameters()))
    assert opt.param_groups[0]["capturable"] is False
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()  # on the CPU: the capturable one raises here


@pytest.mark.parametrize("kw,msg", [(dict(milestones=(0, 5)), "milestones"), (dict(eval_every=0), "eval_every"),
                                    (dict(warmup=-1), "warmup")])
def test_more_bad_configs_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw)


def test_more_bad_train_arguments():
    tr, te = tiny_data()
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(tiny_model()[0], tr, te, cfg(), checkpoint_every=-1)


def test_capture_at_the_last_iteration_gives_the_final_weights():
    tr, te = tiny_data()
    got = {}
    model, _ = tiny_model()
    train(model, tr, te, cfg(iterations=6, eval_every=3), capture_at=6, on_capture=lambda k, s: got.setdefault(k, s))
    assert list(got) == [6]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in got[6].items())


# ------------------------------------------------------------------------------------------------------------ data
def test_each_batch_draws_its_own_augmentation():
    d = DeviceDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), True)
    params = [torch.stack(d.augmentation_params(i, 2, 64)) for i in range(4)]
    assert all(not torch.equal(params[0], p) for p in params[1:])


def _constant_images(n=20, c=3, hw=8, value=5.0):
    return torch.full((n, c, hw, hw), value), torch.arange(n, dtype=torch.int64) % 10


def test_moved_and_split_datasets_pad_with_the_normalized_black_pixel():
    """the crop pads with -mean/std per channel: also after .to() and in the training part of split_off."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x, y = _constant_images()
    d = DeviceDataset(x, y, True, mean=mean, std=std)
    for data in (d, d.to("cpu"), d.split_off(5)[0]):
        assert (data.mean, data.std) == (mean, std)
        xa, _ = data.batch(1, 12, seed=0)
        for ch, pad in enumerate((-2.5, -1.6, -0.6)):
            values = set(xa[:, ch].flatten().tolist())
            assert all(v == 5.0 or abs(v - pad) < 1e-6 for v in values), (ch, values)
            assert any(abs(v - pad) < 1e-6 for v in values)  # (12 crops: some are shifted)


def test_a_limit_above_the_size_gives_the_whole_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", np.arange(5 * 28 * 28).astype(np.uint8).reshape(5, 28, 28))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5], np.uint8))
    d = load_dataset("mnist", "test", root=tmp_path, limit=100)
    assert len(d) == 5 and d.y.tolist() == [3, 1, 4, 1, 5]
    assert load_dataset("mnist", "test", root=tmp_path, limit=2).y.tolist() == [3, 1]


def _write_idx(path, arr: np.ndarray):
    header = (0x0800 + arr.ndim).to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_idx_files_with_different_counts_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_dataset("mnist", "test", root=tmp_path)


def test_an_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="at least one sample"):
        DeviceDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64))


def _cifar_batch(path, data, labels):
    import pickle
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))


def test_cifar_negative_labels_and_missing_batch_files_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _cifar_batch(folder / "test_batch", np.zeros((2, 3072), np.uint8), [0, -1])
    with pytest.raises(ValueError, match="labels outside"):
        load_dataset("cifar10", "test", root=tmp_path)
    for i in range(1, 5):  # data_batch_5 missing
        _cifar_batch(folder / f"data_batch_{i}", np.zeros((2, 3072), np.uint8), [0, 1])
    with pytest.raises(FileNotFoundError, match="expected the files .*data_batch_5"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_milestones_are_normalized_to_a_tuple_of_ints():
    c = cfg(milestones=[5.0, "10"])
    assert c.milestones == (5, 10) and all(type(m) is int for m in c.milestones)


def test_a_ctrl_c_after_the_last_step_is_delivered_not_lost(tmp_path):
    """Ctrl-C that lands after the loop's last look at the stop flag (here: in the loop's final test of
    cfg.iterations) is re-raised once the handlers are put back, as it would have been without the deferral."""
    import os

    armed = []

    @dataclasses.dataclass
    class SignallingConfig(TrainConfig):
        def __getattribute__(self, name):
            if name == "iterations" and armed == [True]:
                armed.append("sent")
                os.kill(os.getpid(), signal.SIGINT)
            return object.__getattribute__(self, name)

    tr, te = tiny_data()
    c = SignallingConfig(**{**dataclasses.asdict(cfg(iterations=6)), "milestones": ()})
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_model()[0], tr, te, c, checkpoint_path=str(tmp_path / "ck.pt"), checkpoint_every=4,
                  callback=lambda it, m: armed.append(True) if it == 6 else None)
    finally:
        signal.signal(signal.SIGINT, before)
    assert armed == [True, "sent"]

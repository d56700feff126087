"""MagnitudePruner: IMP in a training loop of one's own. It must prune and rewind exactly as the driver does (checked
against the driver's saved rounds), keep pruned weights at zero in sparse and plain layers, and refuse bad input."""
import os

import pytest
import torch
from torch import nn

from conftest import tiny_data
from sparse_lth.imp import ImpHparams, _load_weights, apply_masks, dense_weight, get_masks, open_experiment, run_imp
from sparse_lth.layers import sparse_layers, sparsify
from sparse_lth.models import build_model
from sparse_lth.pruner import MagnitudePruner

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lenet(seed=0, sparse=True):
    model = build_model("lenet300_100", width=0.1, seed=seed)  # 784-30-10-10
    return sparsify(model, path="dense") if sparse else model


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("kw", [dict(), dict(prune_global=True, prune_fc=0.3),
                                dict(model="conv2", dataset="fashion_mnist", width=0.125, iterations="6it",
                                     prune_global=True),
                                dict(dense_layers=("fc2",), rewind="4it"),
                                dict(prune_score="movement", rewind="4it"),
                                dict(prune_score="magnitude_increase", prune_global=True)])
def test_prunes_and_rewinds_as_the_driver_does(tmp_path, kw):
    """Given the trained weights of the driver's round r-1, prune_and_rewind gives round r's saved masks and
    exactly the model the driver trains in round r (weights rewound to its rewind point, masks applied)."""
    base = dict(model="lenet300_100", width=0.1, optimizer="adam", lr=3e-3, batch_size=16, iterations="12it",
                eval_every=4, train_eval_size=64, rounds=3, prune_fc=0.2, prune_conv=0.1, prune_output=0.1,
                layer_impl="sparse", path="dense")
    base.update(kw)
    hp = ImpHparams(**base)
    res = run_imp(hp, str(tmp_path), progress=False, data=tiny_data(160, 64), checkpoint_every=0)
    exp = open_experiment(res.experiment_dir, 0)
    seed_dir = os.path.join(res.experiment_dir, "seed_0")
    for r in range(1, hp.rounds + 1):
        model = exp._build_model(0)
        pruner = MagnitudePruner(model, fc=hp.prune_fc, conv=hp.prune_conv, output=hp.prune_output,
                                 global_pruning=hp.prune_global, dense_layers=hp.dense_layers, path=hp.path,
                                 score=hp.prune_score)
        _load_weights(model, load(os.path.join(seed_dir, "rewind.pt")))
        pruner.set_rewind_point()
        prev = os.path.join(seed_dir, f"round_{r - 1:02d}")
        apply_masks(model, load(os.path.join(prev, "masks.pt"))["masks"], path=hp.path)
        _load_weights(model, load(os.path.join(prev, "final.pt")))
        masks = pruner.prune_and_rewind()
        saved = load(os.path.join(seed_dir, f"round_{r:02d}", "masks.pt"))["masks"]
        assert masks.keys() == saved.keys()
        for n in saved:
            assert torch.equal(masks[n], saved[n]), (r, n)
        expected, _, _ = exp.prepare_round(0, r)
        want, got = expected.state_dict(), model.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)
        assert pruner.round == 1
        assert pruner.percent_remaining == pytest.approx(res.metrics[0][r]["percent_remaining"])


@pytest.mark.parametrize("prune_global", [False, True])
def test_pruning_several_rounds_at_once_is_the_drivers_one_shot(tmp_path, prune_global):
    hp = ImpHparams(model="lenet300_100", width=0.1, lr=3e-3, batch_size=16, iterations="12it", eval_every=4,
                    train_eval_size=64, rounds=4, prune_fc=0.2, prune_output=0.1, prune_global=prune_global,
                    layer_impl="sparse", path="dense", control="oneshot")
    res = run_imp(hp, str(tmp_path), progress=False, data=tiny_data(160, 64), checkpoint_every=0)
    exp = open_experiment(res.experiment_dir, 0)
    seed_dir = os.path.join(res.experiment_dir, "seed_0")
    model = exp._build_model(0)
    pruner = MagnitudePruner(model, fc=0.2, output=0.1, global_pruning=prune_global, path="dense")
    _load_weights(model, load(os.path.join(seed_dir, "round_00", "final.pt")))
    masks = pruner.prune(rounds=4)
    saved = load(os.path.join(seed_dir, "round_01", "masks.pt"))["masks"]
    assert all(torch.equal(masks[n], saved[n]) for n in saved) and pruner.round == 4
    assert pruner.percent_remaining == pytest.approx(pruner.schedule(4)[-1])
    again = pruner.prune(rounds=2)  # from a pruned network: the survivors' count of two more rounds
    assert pruner.percent_remaining == pytest.approx(pruner.schedule(6)[-1]) and pruner.round == 6
    assert all(not (again[n] & ~masks[n]).any() for n in masks)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        pruner.prune(rounds=0)


def test_a_loop_of_ones_own_prunes_on_schedule_and_keeps_pruned_weights_zero():
    train, test = tiny_data(160, 64)
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.2)  # output layer at half: 0.1
    assert pruner.rates == {"fc1": 0.2, "fc2": 0.2, "fc3": 0.1}
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.set_rewind_point()
    schedule = pruner.schedule(3)
    seen = [pruner.percent_remaining]
    for r in range(4):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        for it in range(8):
            x, y = train.batch(it, 16, seed=r)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        masks = pruner.masks
        for n, m in model.named_modules():
            if n in masks:  # momentum and weight decay did not revive a pruned weight
                assert (m.dense_weight()[~masks[n]] == 0).all()
        if r < 3:
            new = pruner.prune_and_rewind()
            seen.append(pruner.percent_remaining)
            for n, m in model.named_modules():
                if n in new:  # survivors back at θ0, the rest zero
                    w = m.dense_weight().detach()
                    assert torch.equal(w[new[n]], theta0[f"{n}.weight"][new[n]])
                    assert (w[~new[n]] == 0).all() and not (new[n] & ~masks[n]).any()
    assert seen == pytest.approx(schedule) and pruner.round == 3
    counts = pruner.remaining()  # each round prunes the rate times the survivors, rounded half up
    assert counts["fc1"] == (12042, 23520)  # 23520 -> 18816 -> 15053 -> 12042
    assert counts["fc3"] == (73, 100)  # 100 -> 90 -> 81 -> 73
    assert "round 3" in repr(pruner) and "layer-wise" in repr(pruner)


def test_the_controls_of_the_docstring():
    """Random reinitialization and random pruning from the pruner's masks, as the module docstring writes them."""
    from sparse_lth.imp import apply_masks, random_masks
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.5)
    pruner.set_rewind_point()
    pruner.prune_and_rewind()
    masks = pruner.masks
    fresh = tiny_lenet(seed=1)
    apply_masks(fresh, masks)
    assert torch.equal(fresh.fc1.mask, masks["fc1"])
    assert not torch.equal(fresh.fc1.dense_weight(), model.fc1.dense_weight())
    keep = {n: int(m.sum()) for n, m in masks.items()}
    other = tiny_lenet()
    apply_masks(other, random_masks({n: tuple(m.shape) for n, m in masks.items()}, keep,
                                    torch.Generator().manual_seed(0)))
    for n, m in MagnitudePruner(other).masks.items():
        assert int(m.sum()) == keep[n] and (n == "fc3" or not torch.equal(m, masks[n]))


def test_an_optimizer_built_before_pruning_is_refused_at_its_step():
    model = tiny_lenet()
    pruner = MagnitudePruner(model)
    pruner.set_rewind_point()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner.prune()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    with pytest.raises(RuntimeError, match="optimizer"):
        opt.step()


def test_plain_layers_are_pruned_as_dense_masking():
    train, _ = tiny_data(64, 16)
    model = tiny_lenet(sparse=False)
    pruner = MagnitudePruner(model, fc=0.5, output=0.5)
    pruner.set_rewind_point()
    masks = pruner.prune_and_rewind()
    for n, m in model.named_modules():
        if n in masks:
            assert torch.equal(m.weight_mask, masks[n]) and (m.weight[~masks[n]] == 0).all()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for it in range(3):
        x, y = train.batch(it, 16, seed=0)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.mask_gradients()
        assert (model.fc1.weight.grad[~masks["fc1"]] == 0).all()
        opt.step()
        pruner.remask()
        assert (model.fc1.weight[~masks["fc1"]] == 0).all()
    # a step on an unmasked gradient moves pruned weights of a plain layer; remask zeroes them again
    x, y = train.batch(5, 16, seed=0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc1.weight.grad.fill_(1.0)
    opt.step()
    assert (model.fc1.weight[~masks["fc1"]] != 0).any()
    pruner.remask()
    assert (model.fc1.weight[~masks["fc1"]] == 0).all()


def test_prune_without_rewind_keeps_the_trained_survivors_and_rewind_alone_keeps_the_masks():
    model = tiny_lenet()
    pruner = MagnitudePruner(model)
    pruner.set_rewind_point()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for n, m in model.named_modules():
            if n in pruner.kinds:
                m.set_dense_weight(m.dense_weight() * 1.5 + 0.01)
    trained = {n: m.dense_weight().detach().clone() for n, m in model.named_modules() if n in pruner.kinds}
    masks = pruner.prune()  # "continue" (the paper's control): survivors keep their trained values
    for n, m in model.named_modules():
        if n in masks:
            w = m.dense_weight().detach()
            assert torch.equal(w[masks[n]], trained[n][masks[n]]) and (w[~masks[n]] == 0).all()
    pruner.rewind()
    after = pruner.masks
    for n, m in model.named_modules():
        if n in masks:
            assert torch.equal(after[n], masks[n])
            assert torch.equal(m.dense_weight().detach(), start[f"{n}.weight"] * masks[n])


@pytest.mark.parametrize("kind", ["dense", "sparse", "plain"])
def test_rewind_alone_keeps_the_parameters_so_an_optimizer_built_before_still_steps(kind):
    """rewind() keeps the masks: it gave every layer new parameters all the same (through set_mask), and an
    optimizer built before raised at its step. Now the values are written in place; a plain layer's pruned
    entries are zero again."""
    import sparse_lth.optim as so
    model = tiny_lenet() if kind != "plain" else tiny_lenet(sparse=False)
    if kind == "sparse":
        for _, m in sparse_layers(model):
            m.set_mask(m.weight_mask, path="sparse")
    pruner = MagnitudePruner(model, fc=0.5)
    pruner.set_rewind_point()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pruner.prune()
    params = list(model.parameters())
    opt = so.SGD(params, lr=0.1, momentum=0.9) if kind != "plain" else torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 1, 28, 28)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    if kind == "plain":  # the optimizer revived pruned weights: rewind zeroes them again
        assert any((m.weight[~m.weight_mask] != 0).any() for n, m in model.named_modules() if n in masks)
    pruner.rewind()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    for n, m in model.named_modules():
        if n in masks:
            assert torch.equal(dense_weight(m), start[f"{n}.weight"] * masks[n]), n
            assert torch.equal(m.bias, start[f"{n}.bias"]), n
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # (it raised: "it holds a parameter that sparse-lth replaced")


def test_global_pruning_leaves_a_dense_layer_out_of_its_kinds_pool():
    """dense_layers with global pruning: the layer kept dense is in no pool (a pool that took it would mix rate 0
    with the kind's rate and be refused), and the rest of its kind is pooled alone."""
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.2, global_pruning=True, dense_layers=("fc2",))
    assert pruner.groups == [["fc1"], ["fc3"]] and pruner.rates["fc2"] == 0.0
    pruner.prune()
    assert pruner.remaining() == {"fc1": (18816, 23520), "fc2": (300, 300), "fc3": (90, 100)}


def test_global_pruning_pools_each_kind():
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.5, global_pruning=True)
    assert pruner.groups == [["fc1", "fc2"], ["fc3"]]
    with torch.no_grad():  # fc2's weights all larger than fc1's: a pooled threshold takes fc1's
        model.fc2.set_dense_weight(model.fc2.dense_weight().sign() * 10 + model.fc2.dense_weight())
    pruner.prune()
    live = pruner.remaining()
    assert live["fc2"] == (300, 300)
    assert live["fc1"][0] + live["fc2"][0] == (784 * 30 + 300) - round(0.5 * (784 * 30 + 300))
    assert "global" in repr(pruner)


def test_state_dict_round_trip_continues_the_same_rounds():
    model = tiny_lenet()
    pruner = MagnitudePruner(model)
    pruner.set_rewind_point()
    pruner.prune_and_rewind()
    state = pruner.state_dict()
    model_state = model.state_dict()
    twin = tiny_lenet(seed=3)
    twin.load_state_dict(model_state)
    other = MagnitudePruner(twin)
    other.load_state_dict(state)
    assert other.round == 1 and other.percent_remaining == pruner.percent_remaining
    a, b = pruner.prune_and_rewind(), other.prune_and_rewind()
    for n in a:
        assert torch.equal(a[n], b[n])
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k])
    with pytest.raises(ValueError, match="other rates"):
        MagnitudePruner(tiny_lenet(), fc=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"round": 1})


def test_bad_input_is_refused_clearly():
    model = tiny_lenet()
    with pytest.raises(TypeError, match="nn.Module"):
        MagnitudePruner("model")
    with pytest.raises(ValueError, match="no layer to prune"):
        MagnitudePruner(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"fc must be a fraction in \[0, 1\)"):
        MagnitudePruner(model, fc=1.0)
    with pytest.raises(ValueError, match="conv must be a fraction"):
        MagnitudePruner(model, conv=-0.1)
    with pytest.raises(TypeError, match="output must be a number"):
        MagnitudePruner(model, output="0.1")
    with pytest.raises(ValueError, match=r"dense_layers \['fc9'\] are not prunable layers"):
        MagnitudePruner(model, dense_layers=("fc9",))
    with pytest.raises(ValueError, match="path must be one of"):
        MagnitudePruner(model, path="fast")
    pruner = MagnitudePruner(model)
    with pytest.raises(RuntimeError, match="no rewind point"):
        pruner.prune_and_rewind()
    with pytest.raises(RuntimeError, match="no rewind point"):
        pruner.rewind()
    with pytest.raises(ValueError, match="rounds must be an integer"):
        pruner.schedule(-1)
    changed = tiny_lenet()
    early = MagnitudePruner(changed)
    changed.fc4 = nn.Linear(10, 10)  # a layer added after the pruner was made
    with pytest.raises(RuntimeError, match="prunable layers changed since the pruner was made"):
        early.prune()


def test_a_pruner_made_before_sparsify_prunes_the_sparse_layers():
    """sparsify swaps layers in place under the same names: the pruner finds its layers by name at every call."""
    model = tiny_lenet(sparse=False)
    pruner = MagnitudePruner(model)
    pruner.set_rewind_point()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify(model, path="dense")
    masks = pruner.prune_and_rewind()
    assert type(model.fc1).__name__ == "SparseLinear" and torch.equal(model.fc1.mask, masks["fc1"])
    assert torch.equal(model.fc1.dense_weight().detach(), theta0["fc1.weight"] * masks["fc1"])


def test_sparsify_after_pruning_keeps_the_masks():
    """A plain model pruned first (its layers carry weight_mask buffers) and sparsified after: the sparse layers
    take those masks (they took every weight live: the pruned weights came back to training, and the next round
    pruned from 100 %)."""
    model = tiny_lenet(sparse=False)
    pruner = MagnitudePruner(model)
    pruner.set_rewind_point()
    masks = pruner.prune_and_rewind()
    left = pruner.percent_remaining
    sparsify(model)
    assert type(model.fc1).__name__ == "SparseLinear"
    for name, m in masks.items():
        assert torch.equal(getattr(model, name).mask, m), name
    assert pruner.percent_remaining == left and left < 100
    assert (model.fc1.dense_weight()[~masks["fc1"]] == 0).all()


@pytest.mark.parametrize("wrap", ["data_parallel", "compile"])
def test_a_wrapped_model_prunes_its_output_layer_at_the_output_rate(wrap):
    """DataParallel hides the model's output_layer attribute and torch.compile passes it through unprefixed: the
    output layer was pruned at the fc rate (compile: no layer matched "fc3"; DataParallel: the last Linear, not
    the layer the attribute names)."""
    model = tiny_lenet()
    model.output_layer = "fc2"  # (not the last Linear: the attribute decides)
    wrapped = nn.DataParallel(model) if wrap == "data_parallel" else torch.compile(model)
    prefix = "module." if wrap == "data_parallel" else "_orig_mod."
    pruner = MagnitudePruner(wrapped, fc=0.2)
    assert pruner.kinds == {prefix + "fc1": "fc", prefix + "fc2": "output", prefix + "fc3": "fc"}
    assert pruner.rates[prefix + "fc2"] == 0.1 and pruner.rates[prefix + "fc3"] == 0.2


@pytest.mark.parametrize("name", ["fc4", "relu"])
def test_an_output_layer_attribute_that_names_no_prunable_layer_is_refused(name):
    """A typo (or a module that is not a prunable layer) in ``output_layer`` gave no layer the output rate: the last
    layer was pruned at the fc rate without a word."""
    model = tiny_lenet()
    model.output_layer = name
    with pytest.raises(ValueError, match=f"output_layer '{name}' is not one of its prunable layers \\['fc1', "):
        MagnitudePruner(model, fc=0.2)


def test_an_all_convolutional_model_has_no_output_layer_rate():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    pruner = MagnitudePruner(sparsify(model), conv=0.25)
    assert pruner.kinds == {"0": "conv", "2": "conv"} and pruner.rates == {"0": 0.25, "2": 0.25}
    pruner.prune()
    assert pruner.remaining() == {"0": (54, 72), "2": (60, 80)}


def test_other_scores_prune_the_same_counts_by_their_own_order():
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.5, score="movement")
    assert "score=movement" in repr(pruner)
    with pytest.raises(RuntimeError, match="compares the weights with the rewind point"):
        pruner.prune()
    start = torch.zeros(30, 784)
    start[:, 392:] = 5.0  # at the rewind point: the first half of fc1's inputs 0, the rest 5
    with torch.no_grad():
        model.fc1.set_dense_weight(start)
    pruner.set_rewind_point()
    step = torch.zeros_like(start)
    step[:, :392] = 1.0  # then the first half moves by 1 (to 1), the rest by 0.001 (to 5.001)
    step[:, 392:] = 1e-3
    with torch.no_grad():
        for n in ("fc1", "fc2", "fc3"):
            m = getattr(model, n)
            m.set_dense_weight(m.dense_weight() + (step if n == "fc1" else 0.5))
    masks = pruner.prune()
    assert masks["fc1"][:, :392].all() and not masks["fc1"][:, 392:].any()  # what moved survives, not the largest
    assert pruner.remaining()["fc1"] == (784 * 30 // 2, 784 * 30) and pruner.remaining()["fc3"] == (75, 100)

    grew = MagnitudePruner(tiny_lenet(), fc=0.5, score="magnitude_increase")
    grew.set_rewind_point()
    start = grew.model.fc2.dense_weight().detach().clone()
    with torch.no_grad():  # the weights of fc2's first 5 units double, the others halve
        scale = torch.full_like(start, 0.5)
        scale[:5] = 2.0
        grew.model.fc2.set_dense_weight(start * scale)
    m2 = grew.prune()["fc2"]
    assert m2[:5].all() and m2[5:].sum() == 150 - 5 * 30  # 150 of 300 live: the 150 that grew

    def mine(name, w, w0):  # keep the weights of the first rows, whatever their values
        return -torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape)
    own = MagnitudePruner(tiny_lenet(), fc=0.5, output=0.5, score=mine)
    assert "score=mine" in repr(own)
    out = own.prune()
    assert out["fc3"].reshape(-1)[:50].all() and not out["fc3"].reshape(-1)[50:].any()

    with pytest.raises(ValueError, match="score must be one of"):
        MagnitudePruner(tiny_lenet(), score="gradient")
    with pytest.raises(TypeError, match="score must be a name"):
        MagnitudePruner(tiny_lenet(), score=3)
    with pytest.raises(ValueError, match="score for fc1 must be a tensor of the weight's shape"):
        MagnitudePruner(tiny_lenet(), score=lambda n, w, w0: w[0]).prune()
    with pytest.raises(ValueError, match="score for fc1 has NaN values"):
        MagnitudePruner(tiny_lenet(), score=lambda n, w, w0: w * float("nan")).prune()


def test_the_magnitude_score_is_the_drivers_magnitude_prune():
    from sparse_lth.imp import get_masks, magnitude_prune
    model = tiny_lenet()
    weights = {n: getattr(model, n).dense_weight().detach() for n in ("fc1", "fc2", "fc3")}
    want = magnitude_prune(weights, get_masks(model), {"fc1": 0.3, "fc2": 0.3, "fc3": 0.15}, [["fc1", "fc2"]])
    got = MagnitudePruner(model, fc=0.3, global_pruning=True, score="magnitude").prune()
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_dense_layers_and_a_zero_rate_stay_dense():
    model = tiny_lenet()
    pruner = MagnitudePruner(model, fc=0.5, output=0.0, dense_layers="fc2")
    pruner.prune()
    live = pruner.remaining()
    assert live["fc2"] == (300, 300) and live["fc3"] == (100, 100) and live["fc1"] == (784 * 30 // 2, 784 * 30)


def test_the_example_runs_imp_on_mnist_in_a_plain_loop(tmp_path, capsys):
    """examples/imp_in_your_loop.py (README's example of the pruner in one's own loop), on real MNIST, briefly."""
    import importlib.util
    from conftest import REPO, require_shared_data

    spec = importlib.util.spec_from_file_location("imp_in_your_loop", REPO / "examples" / "imp_in_your_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "rounds.csv"
    assert example.main(["--data", str(require_shared_data()), "--rounds", "2", "--iterations", "60",
                         "--train-limit", "1200", "--prune", "0.5", "--csv", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(out.open()))
    assert [float(r["percent_remaining"]) for r in rows] == pytest.approx([100.0, 50.09, 25.12], abs=0.01)
    assert all(float(r["test_acc"]) > 0.6 for r in rows)  # learned (chance is 0.1) in each round
    printed = capsys.readouterr().out
    assert "weights remaining per round: 100%, 50.1%, 25.1%" in printed


def test_the_ddp_example_runs_imp_in_two_processes():
    """examples/imp_ddp.py as README runs it (two CPU processes, gloo), briefly on real MNIST: every round's
    ranks agree (the script raises otherwise) and every round learned."""
    import subprocess
    import sys

    from conftest import REPO, require_shared_data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # not a rank of some outer torchrun
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(REPO / "examples" / "imp_ddp.py"), "--data", str(require_shared_data()),
                        "--procs", "2", "--rounds", "2", "--iterations", "40", "--prune", "0.5", "--train-limit",
                        "2400", "--test-limit", "1000"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "2 processes on cpu; weights remaining per round: 100%, 50.1%, 25.1%"
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and [r[-1] for r in rows] == ["True"] * 3
    assert [float(r[1]) for r in rows] == pytest.approx([100.0, 50.09, 25.12], abs=0.01)
    assert all(float(r[2]) > 60 for r in rows)  # learned (chance is 10%) in each round


def test_a_compiled_model_follows_a_mask_change():
    """The docstring's claim: torch.compile (dynamo's guards; the aot_eager backend, so no C++ compiler is needed)
    notices the parameters a new mask puts in a sparse layer, forward and backward."""
    model = tiny_lenet()
    model.fc1.path_request = "sparse"
    pruner = MagnitudePruner(model, fc=0.9, output=0.5)
    pruner.set_rewind_point()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(compiled(x), model(x))
    for _ in range(2):
        pruner.prune_and_rewind()
        assert model.fc1.path == "sparse"
        out, want = compiled(x), model(x)
        assert torch.allclose(out, want, rtol=0, atol=1e-6)
        out.sum().backward()
        grad = model.fc1.values.grad.clone()
        model.zero_grad(set_to_none=True)
        want.sum().backward()
        assert torch.allclose(grad, model.fc1.values.grad, rtol=0, atol=1e-6)
        model.zero_grad(set_to_none=True)


def test_imp_under_distributed_data_parallel(tmp_path):
    """Two CPU processes (gloo), the model wrapped in DistributedDataParallel again every round: the ranks end
    every round with the same parameters, the last round runs on the sparse path, and each round is the
    single-process training on both ranks' examples at once (the same masks and starting weights)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    import ddp_worker
    import sparse_lth.optim
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("this torch has no gloo backend: the test needs it (CPU builds of torch have it)")
    out = str(tmp_path / "rounds.pt")
    mp.spawn(ddp_worker.worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2)
    rounds = torch.load(out, weights_only=False)
    assert len(rounds) == ddp_worker.ROUNDS + 1 and all(r["ranks_agree"] for r in rounds)
    assert rounds[0]["paths"] == ["dense"] * 3 and rounds[-1]["paths"][:2] == ["sparse", "sparse"]
    assert rounds[-1]["percent"] < 10
    x, y = ddp_worker.data()
    for r in rounds:
        model = sparsify(ddp_worker.make_model())
        model.load_state_dict(r["start"])  # the round's masks and rewound weights
        got = get_masks(model)
        assert got.keys() == r["masks"].keys() and all(torch.equal(got[n], r["masks"][n]) for n in got)
        opt = sparse_lth.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(ddp_worker.STEPS):
            i = torch.cat([ddp_worker.shard(step, 0), ddp_worker.shard(step, 1)])
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, r["end"][k], rtol=1e-4, atol=1e-5, msg=f"round {r['percent']:.1f}%: {k}")


def test_a_bf16_model_with_a_pruned_dense_path_layer_trains_under_distributed_data_parallel(tmp_path):
    """DDP broadcasts a module's buffers; the dense path's gradient mask (int16 bits for a bf16 weight) was one, and
    gloo (like NCCL) refused it: "Invalid scalar type". It is a plain attribute now."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    import ddp_worker
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("this torch has no gloo backend: the test needs it (CPU builds of torch have it)")
    out = str(tmp_path / "half.pt")
    mp.spawn(ddp_worker.half_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2)
    assert torch.load(out, weights_only=False) == {"ok": True}


def test_a_layer_with_a_reparametrized_weight_is_left_dense_and_named():
    """weight_norm / parametrize compute a layer's weight at every forward, so a mask on it did not hold (the
    pruner counted 720 of 900 live while every weight was nonzero) and prune_and_rewind failed with KeyError
    '0.weight' (the rewind point holds weight_g / weight_v): such layers are kept dense, with a warning naming
    them, and a reparametrized last Linear keeps the output rate from passing to the layer before it."""
    from torch.nn.utils import parametrizations, weight_norm

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    def make():
        torch.manual_seed(0)
        wn = weight_norm(nn.Linear(30, 30))
        par = nn.Linear(30, 20)
        torch.nn.utils.parametrize.register_parametrization(par, "weight", Double())
        sn = parametrizations.spectral_norm(nn.Linear(20, 5))
        return nn.Sequential(wn, nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), par, nn.ReLU(), nn.Linear(20, 20),
                             nn.ReLU(), sn)

    with pytest.warns(UserWarning, match="sparsify: left 0 a plain Linear"):  # sparsify's own warning
        model = sparsify(make())
    with pytest.warns(UserWarning, match=r"not pruned \(kept dense\): 0: its weight is computed by a hook .*; "
                                         r"4: its weight is parametrized .*; 8: its weight is parametrized"):
        pruner = MagnitudePruner(model, fc=0.5)
    assert pruner.kinds == {"2": "fc", "6": "fc"}  # "6" is not the output layer: "8" is, and it stays dense
    pruner.set_rewind_point()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 30)
    model(x).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    masks = pruner.prune_and_rewind()
    assert set(masks) == {"2", "6"} and pruner.remaining() == {"2": (450, 900), "6": (200, 400)}
    for n, p in model.named_parameters():  # everything rewound, the reparametrized layers' parameters too
        if n.endswith(".values") or n.endswith(".weight") and n.split(".")[0] in ("2", "6"):
            continue
        assert torch.equal(p, before[n]), n
    assert not any(hasattr(model[i], "weight_mask") for i in (0, 4, 8))
    model(x)  # and the model still runs
    model.output_layer = "8"  # named as the output layer: accepted (it was refused as no prunable layer)
    with pytest.warns(UserWarning, match="not pruned"):
        assert MagnitudePruner(model, fc=0.5).kinds == {"2": "fc", "6": "fc"}


def test_plain_layers_left_in_a_sparsified_model_are_named_with_what_keeps_them_pruned():
    """sparsify leaves a Linear subclass, MultiheadAttention's out_proj and tied weights plain; the pruner prunes
    them as dense masking, which only mask_gradients/remask keep: the loop for a sparsified model does not call
    them, and the optimizer revived 120 of 128 pruned weights silently. The pruner now says so, once; with the two
    calls the pruned weights stay zero."""
    import warnings

    import sparse_lth.optim as so

    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = MyLinear(16, 16)
            self.out = nn.Linear(16, 50)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.attn(x, x, x)[0])))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify(Net())
    pruner = MagnitudePruner(model, fc=0.5)
    pruner.set_rewind_point()
    with pytest.warns(UserWarning, match=r"pruned layers \['attn.out_proj', 'fc'\] are plain nn.Linear/nn.Conv2d in "
                                         r"a sparsified model .* pruner.mask_gradients\(\) before"):
        pruner.prune_and_rewind()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per pruner
        pruner.prune_and_rewind()
    opt = so.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 7, 16)).square().mean().backward()
        pruner.mask_gradients()
        opt.step()
        pruner.remask()
    for layer in (model.attn.out_proj, model.fc):
        assert (~layer.weight_mask).sum() > 0 and (layer.weight[~layer.weight_mask] == 0).all()
    # a plain model (nothing sparsified) is dense masking as documented: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MagnitudePruner(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))).prune()


def test_a_loaded_pruner_state_is_the_pruners_own_copy():
    """load_state_dict copies the rewind point: editing the dict it was given afterwards changes nothing."""
    model = sparsify(build_model("lenet300_100", width=0.1, seed=0), path="dense")
    a = MagnitudePruner(model)
    a.set_rewind_point()
    state = a.state_dict()
    b = MagnitudePruner(model)
    b.load_state_dict(state)
    want = {k: v.clone() for k, v in b.state_dict()["rewind"].items()}
    for v in state["rewind"].values():
        v.zero_()
    got = b.state_dict()["rewind"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_layerwise_pruner_refuses_a_global_pruners_state():
    """the same rates but other pools (global pruning) is another pruner's state."""
    model = build_model("lenet300_100", width=0.1, seed=0)
    state = MagnitudePruner(model, global_pruning=True).state_dict()
    with pytest.raises(ValueError, match="other rates or layers"):
        MagnitudePruner(model).load_state_dict(state)


def test_a_score_function_gets_the_rewind_weight():
    """after set_rewind_point a custom score receives the layer's rewind-point weight, not None."""
    model = sparsify(build_model("lenet300_100", width=0.1, seed=0), path="dense")
    seen = {}

    def score(name, w, w0):
        seen[name] = None if w0 is None else w0.clone()
        return w.abs()

    p = MagnitudePruner(model, score=score)
    p.set_rewind_point()
    want = {n: m.dense_weight().detach().clone() for n, m in sparse_layers(model)}
    with torch.no_grad():
        for _, m in sparse_layers(model):
            m.set_dense_weight(m.dense_weight() * 3)
    p.prune()
    assert set(seen) == set(want)
    for n in want:
        assert seen[n] is not None and torch.equal(seen[n], want[n]), n

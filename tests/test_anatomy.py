"""Ticket anatomy: starting-weight statistics, connectivity, movement by pruning round and the generalization gap,
on hand-made tensors, on a tiny IMP run and through the ``anatomy`` CLI."""
import json
import os

import pytest
import torch

from conftest import tiny_data
from test_cli import mnist_root, tiny_imp_args
from sparse_lth.anatomy import (anatomy, anatomy_markdown, connectivity_stats, evaluated_gap, generalization_gap,
                                init_weight_stats, input_connectivity, movement_stats, write_anatomy_report)
from sparse_lth.imp import run_imp
from test_stability import tiny_hp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_init_weight_stats():
    w = torch.tensor([-2.0, -1.0, -0.1, 0.0, 0.1, 1.0, 2.0, 0.05])
    mask = torch.tensor([True, False, False, False, False, False, True, False])
    s = init_weight_stats(w, mask, bins=4)
    mean_abs_all = w.abs().mean().item()
    assert s["mean_abs_ratio"] == pytest.approx(2.0 / mean_abs_all)
    sd = w.double().std(unbiased=False).item()
    assert s["near_zero_all"] == pytest.approx(float((w.abs() < 0.5 * sd).double().mean()))
    assert s["near_zero_live"] == 0.0 and s["live"] == 2 and s["n"] == 8
    assert sum(s["hist_all"]) == 8 and sum(s["hist_live"]) == 2 and len(s["edges"]) == 5
    assert init_weight_stats(w, torch.zeros(8, dtype=torch.bool))["mean_abs_ratio"] is None


def test_connectivity_stats_linear_and_conv():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # 2 outputs, 3 inputs
    s = connectivity_stats(m)
    inc = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    out = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert s["incoming_cv"] == pytest.approx(float(inc.std(unbiased=False) / inc.mean()))
    assert s["outgoing_cv"] == pytest.approx(float(out.std(unbiased=False) / out.mean()))
    assert s["inputs_disconnected"] == pytest.approx(1 / 3) and s["density"] == pytest.approx(0.5)
    conv = torch.zeros(2, 3, 2, 2, dtype=torch.bool)  # input channel 0 feeds everything, channel 2 nothing
    conv[:, 0] = True
    conv[0, 1, 0, 0] = True
    c = connectivity_stats(conv)
    assert c["outgoing_max"] == 1.0 and c["outgoing_min"] == 0.0 and c["inputs_disconnected"] == pytest.approx(1 / 3)
    assert c["incoming_max"] == pytest.approx(5 / 12) and c["incoming_min"] == pytest.approx(4 / 12)
    assert connectivity_stats(torch.zeros(2, 2, dtype=torch.bool))["incoming_cv"] is None


def test_input_connectivity_of_a_first_linear_layer():
    m = torch.zeros(4, 2 * 3 * 3, dtype=torch.bool)  # 4 units reading a 2x3x3 image
    m[:, 4] = True  # channel 0, centre pixel: all 4 units
    m[0, 9 + 4] = True  # channel 1, centre pixel: 1 unit
    m[1, 0] = True  # channel 0, corner: 1 unit
    g = input_connectivity(m, (2, 3, 3))
    assert g[1][1] == pytest.approx((1.0 + 0.25) / 2) and g[0][0] == pytest.approx(0.25 / 2) and g[2][2] == 0.0
    assert input_connectivity(m, (1, 28, 28)) is None  # another width
    assert input_connectivity(torch.ones(3, 2, 3, 3, dtype=torch.bool), (2, 3, 3)) is None  # a conv layer
    assert input_connectivity(m, None) is None  # a dataset of unknown shape


def test_movement_by_pruning_round():
    start = {"a.weight": torch.zeros(2, 2)}
    trained = {"a.weight": torch.tensor([[1.0, -2.0], [3.0, 4.0]])}
    masks = {0: {"a": torch.ones(2, 2, dtype=torch.bool)},
             1: {"a": torch.tensor([[False, True], [True, True]])},   # pruned 1.0 in round 1
             2: {"a": torch.tensor([[False, False], [True, True]])}}  # pruned -2.0 in round 2
    m = movement_stats(start, trained, masks, ["a"])
    assert m["last_round"] == 2
    assert m["pooled"]["1"] == dict(mean=1.0, count=1) and m["pooled"]["2"] == dict(mean=2.0, count=1)
    assert m["pooled"]["survivors"] == dict(mean=3.5, count=2)
    assert m["per_layer"]["a"] == {"1": 1.0, "2": 2.0, "survivors": 3.5}


def test_generalization_gap():
    metrics = dict(early_stop_iteration=10, train_acc=0.99, test_acc=0.95,
                   curve=[dict(iteration=0, test_acc=0.1, train_acc=0.1), dict(iteration=10, test_acc=0.9,
                                                                                train_acc=0.97)])
    g = generalization_gap(metrics)
    assert g["at_early_stop"] == pytest.approx(0.07) and g["at_end"] == pytest.approx(0.04)
    metrics["curve"][1].pop("train_acc")
    metrics["train_acc"] = None
    assert generalization_gap(metrics) == dict(at_early_stop=None, at_end=None)


def test_anatomy_of_an_imp_run_and_its_reinit_control(tmp_path):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=3)
    res = run_imp(hp, str(tmp_path), progress=False, data=data)
    d = anatomy(res.experiment_dir, 0)
    assert d["control"] == "imp" and list(d["remaining"]) == ["0", "1", "2", "3"]
    assert {"0", "3"} <= set(d["init_weights"]) and len(d["init_weights"]) in (2, 3)  # first, middle, last
    final_masks = torch.load(os.path.join(res.experiment_dir, "seed_0", "round_03", "masks.pt"),
                             weights_only=False)["masks"]
    pooled = d["movement"]["pooled"]
    total = sum(m.numel() for m in final_masks.values())
    assert sum(v["count"] for v in pooled.values()) == total
    assert pooled["survivors"]["count"] == sum(int(m.sum()) for m in final_masks.values())
    for r, layers in d["connectivity"].items():
        for n, c in layers.items():
            assert 0 < c["density"] <= 1
    with open(os.path.join(res.experiment_dir, "seed_0", "anatomy.json")) as f:
        assert json.load(f) == json.loads(json.dumps(d))
    # where fc1 reads the 1x28x28 image: each pixel's live fraction of its 30 outgoing weights (width 0.1)
    pix = d["input_connectivity"]
    assert pix["layer"] == "fc1" and set(pix["rounds"]) == set(d["init_weights"])
    for r, grid in pix["rounds"].items():
        want = final_masks["fc1"] if r == "3" else None
        assert len(grid) == 28 and all(len(row) == 28 for row in grid)
        if want is not None:
            frac = want.double().mean(0).view(28, 28)
            assert torch.allclose(torch.tensor(grid, dtype=torch.float64), frac, atol=5e-5)
    assert pix["rounds"]["0"] == [[1.0] * 28] * 28
    ctl = run_imp(tiny_hp(rounds=3, control="reinit"), str(tmp_path), progress=False, data=data)
    c = anatomy(ctl.experiment_dir, 0, rounds=[0, 2])
    assert c["init_weights"] is None and c["movement"] is None and c["connectivity"]["2"] == d["connectivity"]["2"]
    assert set(c["input_connectivity"]["rounds"]) == {"0", "2"}
    files = write_anatomy_report([d, c], str(tmp_path / "rep"), title="tiny")
    for k in ("figure", "init_weights", "input_pixels", "summary"):
        assert os.path.getsize(files[k]) > 0
    text = open(files["summary"]).read()
    assert "control imp" in text and "control reinit" in text and "| survivors |" in text
    assert "| 0 | 100.00 | 784 of 784 | 0 | 25.0% |" in text  # the central quarter holds a quarter of a full layer
    with pytest.raises(ValueError, match="have not finished"):
        anatomy(res.experiment_dir, 0, rounds=[7])
    with pytest.raises(FileNotFoundError, match="no replicate"):
        anatomy(res.experiment_dir, 4)


def test_the_gap_evaluated_at_the_end_of_training(tmp_path):
    """--evaluate runs each round's trained network: on the whole test set it must give the run's own final test
    accuracy to the last digit (same weights, same data), and its train accuracy is over the examples asked for."""
    from sparse_lth.imp import load_ticket
    from sparse_lth.train import evaluate
    data = tiny_data(240, 120)
    res = run_imp(tiny_hp(rounds=2), str(tmp_path), progress=False, data=data)
    d = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=100, data=data)
    for r, m in enumerate(res.metrics[0]):
        e = d["generalization_gap"][str(r)]["evaluated"]
        assert e["test_acc"] == m["test_acc"] and e["train_examples"] == 100 and e["test_examples"] == 120
        model = load_ticket(res.experiment_dir, r, weights="final")
        with torch.no_grad():
            _, want = evaluate(model, [(data[0].x[:100], data[0].y[:100])])
        assert e["train_acc"] == want and e["gap"] == pytest.approx(want - m["test_acc"])
    assert evaluated_gap(res.experiment_dir, 0, [1], data=data)["1"]["train_examples"] == 240  # 0: all
    text = anatomy_markdown([d])
    assert "| train / test acc at end (%) | gap at end (pp) |" in text and "evaluated on 100 training examples" in text
    assert "train / test acc at end" in anatomy_markdown([anatomy(res.experiment_dir, 0)])  # kept from the call above
    os.remove(os.path.join(res.experiment_dir, "seed_0", "anatomy.json"))
    assert "train / test acc at end" not in anatomy_markdown([anatomy(res.experiment_dir, 0)])  # never asked: absent
    files = write_anatomy_report([d], str(tmp_path / "rep"))
    assert os.path.getsize(files["figure"]) > 0
    with pytest.raises(ValueError, match="train_examples must be an integer >= 0"):
        evaluated_gap(res.experiment_dir, 0, [0], train_examples=-1, data=data)
    with pytest.raises(ValueError, match="have not finished"):
        evaluated_gap(res.experiment_dir, 0, [5], data=data)


def test_a_bf16_run_is_evaluated_as_it_ran(tmp_path):
    """An IMP run with precision bf16 (its own folder) evaluates under bf16 autocast; --evaluate does too, so it
    gives the run's recorded test accuracy to the last digit."""
    import dataclasses
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    res = run_imp(dataclasses.replace(hp, precision="bf16"), str(tmp_path), progress=False, data=data)
    fp32 = run_imp(hp, str(tmp_path), progress=False, data=data)
    assert res.experiment_dir != fp32.experiment_dir
    assert [m["test_loss"] for m in res.metrics[0]] != [m["test_loss"] for m in fp32.metrics[0]]
    d = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=100, data=data)
    for r, m in enumerate(res.metrics[0]):
        assert d["generalization_gap"][str(r)]["evaluated"]["test_acc"] == m["test_acc"]


def test_an_evaluated_gap_is_kept_and_reused(tmp_path, monkeypatch):
    """A later call without evaluate keeps the evaluated gaps in anatomy.json; a later call with it runs only the
    rounds that lack one for the same train_examples; an entry whose round no longer has its test accuracy goes."""
    import json

    import sparse_lth.anatomy as an
    data = tiny_data(240, 120)
    res = run_imp(tiny_hp(rounds=2), str(tmp_path), progress=False, data=data)
    first = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=100, data=data)
    want = {r: g["evaluated"] for r, g in first["generalization_gap"].items()}
    assert sorted(want) == ["0", "1", "2"]
    kept = anatomy(res.experiment_dir, 0)  # no evaluate: kept, not lost
    assert {r: g["evaluated"] for r, g in kept["generalization_gap"].items()} == want
    asked = []
    real = an.evaluated_gap

    def counting(exp_dir, seed, rounds, **kw):
        asked.append((list(rounds), kw["train_examples"]))
        return real(exp_dir, seed, rounds, **kw)
    monkeypatch.setattr(an, "evaluated_gap", counting)
    again = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=100, data=data)
    assert asked == [] and {r: g["evaluated"] for r, g in again["generalization_gap"].items()} == want
    path = os.path.join(res.experiment_dir, "seed_0", "anatomy.json")
    d = json.load(open(path))
    del d["generalization_gap"]["2"]["evaluated"]  # as if round 2 had finished after the last call
    json.dump(d, open(path, "w"))
    again = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=100, data=data)
    assert asked == [([2], 100)] and again["generalization_gap"]["2"]["evaluated"] == want["2"]
    other = anatomy(res.experiment_dir, 0, evaluate=True, train_examples=50, data=data)  # another measure: all again
    assert asked[-1] == ([0, 1, 2], 50)
    assert all(g["evaluated"]["train_examples"] == 50 for g in other["generalization_gap"].values())
    m = os.path.join(res.experiment_dir, "seed_0", "round_01", "metrics.json")
    rec = json.load(open(m))
    rec["test_acc"] -= 0.01  # round 1 no longer the one evaluated (run again, say): its entry is dropped
    json.dump(rec, open(m, "w"))
    gone = anatomy(res.experiment_dir, 0)
    assert "evaluated" not in gone["generalization_gap"]["1"] and "evaluated" in gone["generalization_gap"]["0"]
    with pytest.raises(ValueError, match="train_examples must be an integer >= 0"):
        anatomy(res.experiment_dir, 0, evaluate=True, train_examples=-3, data=data)


def test_anatomy_cli(tmp_path, capsys):
    from sparse_lth.cli import main
    assert main(tiny_imp_args(tmp_path, "--no-report")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    capsys.readouterr()
    assert main(["anatomy", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "| round | % remaining | gap at early stop (pp) |" in out and "| survivors |" in out
    assert (exp / "anatomy" / "init_weights.png").stat().st_size > 0
    assert (exp / "anatomy" / "input_pixels.png").stat().st_size > 0
    assert main(["report", str(exp), "--out", str(tmp_path / "rep")]) == 0  # drawn again by `report`
    assert (tmp_path / "rep" / "anatomy.png").stat().st_size > 0 and (tmp_path / "rep" / "anatomy.md").exists()
    assert not (tmp_path / "rep" / "stability.md").exists()  # no stability analysis was run
    assert main(["anatomy", str(tmp_path)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    # a replicate just started beside the finished one (no round finished yet) is left out, and said so;
    # named with --seeds, it is refused
    (exp / "seed_1").mkdir()
    assert main(["anatomy", str(exp), "--out", str(tmp_path / "an")]) == 0
    err = capsys.readouterr().err
    assert "seed(s) [1] left out, no finished round yet" in err
    md = (tmp_path / "an" / "anatomy.md").read_text()
    assert "(seed 0, control imp)" in md and "(seed 1," not in md
    assert main(["anatomy", str(exp), "--seeds", "1"]) == 2
    assert "seed 1 of" in capsys.readouterr().err
    (exp / "seed_1").rmdir()
    # --device and --train-examples set how --evaluate runs: without it, refused (they were ignored)
    for extra in (["--device", "cpu"], ["--train-examples", "150"]):
        assert main(["anatomy", str(exp), *extra]) == 2
        assert f"{extra[0]} set how --evaluate runs the networks" in capsys.readouterr().err
    assert main(["anatomy", str(exp), "--evaluate", "--train-examples", "150", "--data", mnist_root(),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| gap at end (pp) |" in out and "evaluated on 150 training examples and 200 test examples" in out


def test_near_zero_survivors_are_within_half_a_standard_deviation():
    """The threshold is half a standard deviation of all the starting weights (the test's survivors were +-2, far from
    any threshold)."""
    from sparse_lth.anatomy import init_weight_stats
    w = torch.tensor([-2.0, -1.0, -0.1, 0.0, 0.1, 1.0, 2.0, 0.05])
    sd = w.double().std(unbiased=False).item()  # ~1.07: 1.0 is within 1 sd, not within 0.5 sd
    mask = torch.tensor([False, True, False, False, False, True, False, False])
    assert init_weight_stats(w, mask)["near_zero_live"] == 0.0
    mask[4] = True
    assert init_weight_stats(w, mask)["near_zero_live"] == pytest.approx(1 / 3)


def test_anatomy_of_a_late_rewinding_run_describes_the_rewind_point(tmp_path):
    """With late rewinding the survivors start from rewind.pt, not init.pt (the tests rewound to 0, where they
    are the same weights)."""
    from sparse_lth.anatomy import init_weight_stats
    res = run_imp(tiny_hp(rounds=1, rewind="5it"), str(tmp_path), progress=False, data=tiny_data(240, 120))
    a = anatomy(res.experiment_dir, 0)
    sdir = os.path.join(res.experiment_dir, "seed_0")
    rew = torch.load(os.path.join(sdir, "rewind.pt"), weights_only=False)
    masks = torch.load(os.path.join(sdir, "round_01", "masks.pt"), weights_only=False)["masks"]
    assert a["start"] == "rewind.pt"
    for n, mk in masks.items():
        assert a["init_weights"]["1"][n]["mean_abs_ratio"] == pytest.approx(
            init_weight_stats(rew[f"{n}.weight"], mk)["mean_abs_ratio"])

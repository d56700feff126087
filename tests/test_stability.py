"""Linear mode connectivity / instability analysis: interpolation, the error barrier, batch-norm statistics, the
analysis of IMP rounds (its copies are IMP's own rounds under another data order) and the ``stability`` CLI."""
import json
import os
import shutil

import pytest
import torch
from torch import nn

import test_imp
from conftest import tiny_data
from test_cli import tiny_imp_args
from sparse_lth import stability
from sparse_lth.data import DeviceDataset
from sparse_lth.imp import Experiment, ImpHparams, run_imp
from sparse_lth.layers import sparsify
from sparse_lth.stability import (error_barrier, instability, interpolate_state, linear_path, noise_seeds_for,
                                  reset_bn_statistics)
from sparse_lth.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def small_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


# ------------------------------------------------------------------------------------------- interpolation
def test_interpolate_state_lerps_floats_and_keeps_masks_and_counters():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3), "l.weight_mask": torch.tensor([True, False])}
    b = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor(7), "l.weight_mask": torch.tensor([True, False])}
    for alpha, want in ((0.0, [0.0, 2.0]), (0.25, [1.0, 1.0]), (1.0, [4.0, -2.0])):
        out = interpolate_state(a, b, alpha)
        assert out["w"].tolist() == want
        assert out["n"].item() == 3 and out["l.weight_mask"].tolist() == [True, False]
    out["l.weight_mask"][0] = False  # a copy, not a's tensor
    assert a["l.weight_mask"][0]
    with pytest.raises(ValueError, match="different masks"):
        interpolate_state(a, {**b, "l.weight_mask": torch.tensor([True, True])}, 0.5)
    with pytest.raises(ValueError, match="different entries"):
        interpolate_state(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate_state(a, {**b, "w": torch.zeros(3)}, 0.5)


def test_error_barrier():
    path = [dict(alpha=0.0, test_error=0.1), dict(alpha=1.0, test_error=0.2), dict(alpha=0.5, test_error=0.3)]
    assert error_barrier(path) == pytest.approx(0.3 - 0.15)
    flat = [dict(alpha=a / 4, test_error=0.1) for a in range(5)]
    assert error_barrier(flat) == 0.0
    # the paper's definition measures from the mean of the ends: a straight line from 10% to 18% has 4 points
    line = [dict(alpha=a / 4, test_error=0.1 + 0.02 * a) for a in range(5)]
    assert error_barrier(line) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        error_barrier(path, "train")
    with pytest.raises(ValueError):
        error_barrier(path[:1])


@pytest.mark.parametrize("layers", ["plain", "sparse"])
def test_linear_path_evaluates_each_interpolated_network(layers):
    tr, te = tiny_data(120, 60)
    a, b = small_mlp(0), small_mlp(1)
    model = small_mlp(2)
    if layers == "sparse":  # the same mask on both ends, on the sparse path
        g = torch.Generator().manual_seed(0)
        masks = {n: torch.rand(m.weight.shape, generator=g) < 0.3 for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
        a, b, model = (sparsify(m, masks, path="sparse") for m in (a, b, model))
    sa, sb = a.state_dict(), b.state_dict()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    path = linear_path(model, sa, sb, te, points=5, train_data=tr, train_eval_size=50, eval_batch_size=32)
    assert [r["alpha"] for r in path] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # every point is the network with the interpolated weights, evaluated as `evaluate` does
    ref = small_mlp(3)
    for row in path:
        sd = {k: torch.lerp(sa[k].float(), sb[k].float(), row["alpha"]) for k in ref.state_dict()}
        ref.load_state_dict(sd)
        loss, acc = evaluate(ref, te.eval_batches(32))
        assert row["test_loss"] == pytest.approx(loss, rel=1e-4) and row["test_acc"] == acc
        assert row["test_error"] == pytest.approx(1 - acc)
        loss, acc = evaluate(ref, [(tr.x[:50], tr.y[:50])])
        assert row["train_loss"] == pytest.approx(loss, rel=1e-4) and row["train_acc"] == acc
    if layers == "sparse":  # the mid-point keeps the mask: pruned weights stay zero
        mid = interpolate_state(sa, sb, 0.5)
        for n in masks:
            assert (mid[f"{n}.weight"][~masks[n]] == 0).all()
    for k, v in model.state_dict().items():  # the model's own weights are back
        assert torch.equal(v, own[k])
    with pytest.raises(ValueError, match="points"):
        linear_path(model, sa, sb, te, points=1)


def test_reset_bn_statistics_averages_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 10),
                          nn.Dropout(0.5))
    data = DeviceDataset(torch.randn(64, 1, 28, 28) * 3 + 1, torch.randint(0, 10, (64,)))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    model.train()
    reset_bn_statistics(model, data, batches=4, batch_size=16, seed=3)
    with torch.no_grad():
        means = [model[0](data.batch(i, 16, 3)[0]).mean(dim=(0, 2, 3)) for i in range(4)]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and model.training and model[5].training  # settings put back
    assert bn.num_batches_tracked.item() == 4


def test_linear_path_with_bn_reset_changes_only_the_statistics():
    torch.manual_seed(0)
    tr, te = tiny_data(96, 48)

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 2, 3, stride=3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(2 * 9 * 9, 10))
    a, b, model = net(0), net(1), net(2)
    for m in (a, b):  # give them different, non-trivial statistics
        m.train()
        with torch.no_grad():
            m(tr.x[:48] * (2 if m is a else 0.5))
    plain = linear_path(model, a.state_dict(), b.state_dict(), te, points=3)
    reset = linear_path(model, a.state_dict(), b.state_dict(), te, points=3, train_data=tr, bn_reset_batches=2,
                        bn_batch_size=48)
    assert plain[0]["test_loss"] != pytest.approx(reset[0]["test_loss"], rel=1e-3)
    ref = net(3)  # a=0 with reset = a's weights with the statistics of two training batches
    ref.load_state_dict(a.state_dict())
    reset_bn_statistics(ref, tr, 2, 48, 0)
    assert reset[0]["test_loss"] == pytest.approx(evaluate(ref, te.eval_batches(1000))[0], rel=1e-5)
    with pytest.raises(ValueError, match="train_data"):
        linear_path(model, a.state_dict(), b.state_dict(), te, bn_reset_batches=2)


# ------------------------------------------------------------------------------------------- on an IMP run
def tiny_hp(**kw) -> ImpHparams:
    return test_imp.tiny_hp(**{"rounds": 2, "prune_fc": 0.5, "prune_output": 0.2, **kw})


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("rewind", ["0it", "5it"])
def test_instability_of_imp_rounds(tmp_path, rewind, monkeypatch):
    data = tiny_data(240, 120)
    hp = tiny_hp(rewind=rewind)
    res = run_imp(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    k = exp.rewind_iteration
    results = {}
    for r in range(3):
        rdir = exp.round_dir(0, r)
        # noise seed 0 is the replicate's own data order: from round 1 on (and in round 0 when it starts at
        # iteration 0) that copy IS the IMP round, bit for bit on CPU
        d = results[r] = instability(exp, 0, r, noise_seeds=(0, 11), points=3)
        sdir = os.path.join(rdir, "stability")
        copy0, copy1 = load(os.path.join(sdir, "copy_0.pt")), load(os.path.join(sdir, "copy_11.pt"))
        if r > 0 or k == 0:
            final = load(os.path.join(rdir, "final.pt"))
            assert all(torch.equal(copy0[n], final[n]) for n in final)
        masks = load(os.path.join(rdir, "masks.pt"))["masks"]
        for n, mk in masks.items():
            assert torch.equal(copy0[f"{n}.weight_mask"], mk) and torch.equal(copy1[f"{n}.weight_mask"], mk)
            assert (copy1[f"{n}.weight"][~mk] == 0).all()
        assert any(not torch.equal(copy0[n], copy1[n]) for n in copy0 if n.endswith(".weight"))
        assert d["round"] == r and d["start_iteration"] == k and d["noise_seeds"] == [0, 11]
        assert d["percent_remaining"] == pytest.approx(res.metrics[0][r]["percent_remaining"])
        assert [p["alpha"] for p in d["path"]] == [0.0, 0.5, 1.0]
        # the ends of the path are the copies themselves
        assert d["path"][0]["test_acc"] == d["copies"][0]["test_acc"]
        assert d["path"][-1]["test_acc"] == d["copies"][1]["test_acc"]
        assert d["test_barrier"] == pytest.approx(error_barrier(d["path"])) and d["test_barrier"] >= 0
        assert d["train_barrier"] == pytest.approx(error_barrier(d["path"], "train"))
        with open(os.path.join(sdir, "stability_noise_0_11.json")) as f:  # not the default pair: its own file
            assert json.load(f) == json.loads(json.dumps(d))
        assert not [f for f in os.listdir(sdir) if f.startswith("checkpoint")]
    # a finished analysis is read back, not trained again; other settings reuse the trained copies
    monkeypatch.setattr(stability, "train", lambda *a, **kw: pytest.fail("trained again"))
    again = instability(exp, 0, 1, noise_seeds=(0, 11), points=3)
    assert again == json.loads(json.dumps(results[1]))
    five = instability(exp, 0, 1, noise_seeds=(0, 11), points=5)
    assert len(five["path"]) == 5 and five["path"][0]["test_acc"] == again["path"][0]["test_acc"]
    assert five["path"][2]["test_acc"] == again["path"][1]["test_acc"]


def test_instability_resumes_an_interrupted_copy(tmp_path):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    run_imp(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    ref = instability(exp, 0, 1, noise_seeds=(3, 4), points=3)
    sdir = stability.stability_dir(exp, 0, 1)
    ref_copy = load(os.path.join(sdir, "copy_4.pt"))
    for f in os.listdir(sdir):
        os.remove(os.path.join(sdir, f))

    calls = []
    real_train = stability.train

    def stop_after_12(*a, **kw):  # the second copy is killed after 12 of its 20 iterations
        calls.append(1)
        if len(calls) == 2:
            def cb(it, m):
                if it == 12:
                    raise KeyboardInterrupt
            kw["callback"] = cb
        return real_train(*a, **kw)
    stability.train = stop_after_12
    try:
        with pytest.raises(KeyboardInterrupt):
            instability(exp, 0, 1, noise_seeds=(3, 4), points=3)
    finally:
        stability.train = real_train
    assert os.path.exists(os.path.join(sdir, "checkpoint_4.pt")) and os.path.exists(os.path.join(sdir, "copy_3.pt"))
    out = instability(exp, 0, 1, noise_seeds=(3, 4), points=3)
    resumed = load(os.path.join(sdir, "copy_4.pt"))
    assert all(torch.equal(resumed[n], ref_copy[n]) for n in ref_copy)
    assert out["path"] == ref["path"] and out["test_barrier"] == ref["test_barrier"]


def test_reports_tell_experiments_apart(tmp_path):
    """Two IMP experiments that differ only in their rewind point get one line each, labelled by k; a control
    is labelled by its name; files written before results named their experiment still group by folder."""
    data = tiny_data(240, 120)
    results = []
    for rewind in ("0it", "5it"):
        hp = tiny_hp(rounds=1, rewind=rewind)
        run_imp(hp, str(tmp_path), progress=False, data=data)
        exp = Experiment(hp, str(tmp_path), progress=False, data=data)
        d = instability(exp, 0, 1, noise_seeds=(1, 2), points=3)
        assert d["experiment"] == os.path.basename(exp.dir)
        results += stability.load_stability(exp.dir)
    groups = stability._groups(results)
    assert sorted(g[0] for g in groups) == ["k=0, seed 0", "k=5, seed 0"]
    assert all(len(rows) == 1 for _, rows in groups)
    files = stability.write_stability_report(results, str(tmp_path / "rep"), title="tiny")
    text = open(files["summary"]).read()
    assert "| imp | 0 | 0 | 1 |" in text and "| imp | 5 | 0 | 1 |" in text and "each experiment's rewind" in text
    # a result file without its experiment's name (older files) is named by its folder when loaded
    old = dict(results[0])
    old.pop("experiment")
    path = os.path.join(tmp_path, results[0]["experiment"], "seed_0", "round_01", "stability",
                        "stability_noise_1_2.json")
    with open(path, "w") as f:
        json.dump(old, f)
    assert stability.load_stability(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(path)))))[0][
        "experiment"] == results[0]["experiment"]
    # one experiment alone: no experiment label
    assert [g[0] for g in stability._groups(results[:1])] == ["seed 0"]


def test_dense_instability_forks_the_dense_trajectory(tmp_path, monkeypatch):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1, rewind="5it")
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    out = stability.dense_instability(exp, 0, [12, 0, 5], noise_seeds=(0, 9), points=3)
    assert [d["iteration"] for d in out] == [0, 5, 12]
    base = stability.dense_stability_dir(exp, 0)
    # the weights at k are IMP's round 0 at k: its rewind point, bit for bit on CPU
    rewind = load(os.path.join(exp.seed_dir(0), "rewind.pt"))
    state5 = load(os.path.join(base, "state_5.pt"))
    assert all(torch.equal(state5[k], rewind[k]) for k in rewind)
    # copies from k=5 are the round-0 copies of the round analysis, which also start at the rewind point
    r0 = instability(exp, 0, 0, noise_seeds=(0, 9), points=3)
    assert out[1]["path"] == r0["path"] and out[1]["test_barrier"] == r0["test_barrier"]
    for d in out:
        assert d["kind"] == "dense" and d["test_barrier"] == pytest.approx(error_barrier(d["path"]))
        assert os.path.exists(os.path.join(base, f"k_{d['iteration']:06d}", "stability_noise_0_9.json"))
    c12 = load(os.path.join(base, "k_000012", "copy_9.pt"))
    c0 = load(os.path.join(base, "k_000000", "copy_9.pt"))
    assert any(not torch.equal(c12[k], c0[k]) for k in c12 if k.endswith(".weight"))
    # finished iterations are read back; a new one trains only what it lacks
    calls = []
    real = stability.train
    monkeypatch.setattr(stability, "train", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    again = stability.dense_instability(exp, 0, [0, 5, 12], noise_seeds=(0, 9), points=3)
    assert again == json.loads(json.dumps(out)) and calls == []
    more = stability.dense_instability(exp, 0, [5, 8], noise_seeds=(0, 9), points=3)
    assert more[0] == again[1] and len(calls) == 3 and "to iteration 8" in calls[0]
    assert [d["iteration"] for d in stability.load_dense_stability(exp.dir)] == [0, 5, 8, 12]
    files = stability.write_dense_stability_report(stability.load_dense_stability(exp.dir), str(tmp_path / "r"))
    assert os.path.getsize(files["dense_barrier"]) > 0 and "| 0 | 12 |" in open(files["dense_summary"]).read()
    with pytest.raises(ValueError, match="not in"):
        stability.dense_instability(exp, 0, [20])
    with pytest.raises(ValueError, match="no iterations"):
        stability.dense_instability(exp, 0, [])


def test_instability_refuses_bad_requests(tmp_path):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    with pytest.raises(FileNotFoundError, match="run the IMP experiment"):
        instability(exp, 0, 0)
    run_imp(hp, str(tmp_path), progress=False, data=data)
    with pytest.raises(ValueError, match="two different seeds"):
        instability(exp, 0, 1, noise_seeds=(2, 2))
    with pytest.raises(ValueError, match="not a round"):
        instability(exp, 0, 5)
    assert noise_seeds_for(0) != noise_seeds_for(1) and len(set(noise_seeds_for(0))) == 2


# ------------------------------------------------------------------------------------------------------- CLI
def test_stability_cli(tmp_path, capsys):
    from conftest import require_shared_data
    from sparse_lth.cli import main
    data = str(require_shared_data())  # fails, never skips, when the data is missing
    assert main(tiny_imp_args(tmp_path, "--no-report")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    capsys.readouterr()
    # no data: refused before a round's analysis folder is made (an empty one was left behind)
    assert main(["stability", str(exp), "--data", str(tmp_path / "no_data"), "--rounds", "1", "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err and not (exp / "seed_0" / "round_01" / "stability").exists()
    argv = ["stability", str(exp), "--data", data, "--rounds", "0,2", "--points", "3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] == ["imp"]]
    assert [r[1:3] for r in rows] == [["0", "0"], ["0", "2"]]
    assert "| experiment | k | seed | round |" in out
    for name in ("error_along_path.png", "barrier_vs_remaining.png", "stability.md"):
        assert (exp / "stability" / name).stat().st_size > 0
    for r in (0, 2):
        with open(exp / "seed_0" / f"round_{r:02d}" / "stability" / "stability.json") as f:
            d = json.load(f)
        assert d["noise_seeds"] == list(noise_seeds_for(0)) and len(d["path"]) == 3
        assert d["environment"]["threads"] == torch.get_num_threads()  # where the copies were trained
    table = out[out.index("| seed |"):].split("error_along_path")[0]
    assert main(argv) == 0  # a re-run reads the finished analyses back: the same table
    assert table in capsys.readouterr().out
    # the dense network's instability at chosen iterations
    assert main(["stability", str(exp), "--data", data, "--dense-at", "0,10", "--points", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"| {exp.name} | 0 | 10 |" in out and f"| {exp.name} | 0 | 0 |" in out and "| imp | 0 | 0 | 2 |" not in out
    assert (exp / "stability" / "dense_barrier_vs_iteration.png").stat().st_size > 0
    # `report` draws the finished analyses again beside its own figures
    assert main(["report", str(exp), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    for name in ("accuracy_vs_remaining.png", "barrier_vs_remaining.png", "dense_barrier_vs_iteration.png",
                 "stability.md", "dense_stability.md"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    # IMP and its random-reinit control in one report
    assert main(tiny_imp_args(tmp_path, "--no-report", "--control", "reinit")) == 0
    reinit = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_reinit_"))
    capsys.readouterr()
    assert main(["stability", str(exp), str(reinit), "--data", data, "--rounds", "2", "--points", "3",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| imp | 0 | 0 | 2 |" in out and "| reinit | 0 | 0 | 2 |" in out and "| imp | 0 | 0 | 0 |" in out
    assert (tmp_path / "stability" / "barrier_vs_remaining.png").stat().st_size > 0  # the common parent
    assert main(["stability", str(tmp_path), "--data", data]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    assert main(["stability", str(exp), "--data", data, "--noise-seeds", "1,2,3"]) == 2
    assert "two seeds" in capsys.readouterr().err


def test_each_pair_of_noise_seeds_keeps_its_result(tmp_path):
    """A round analysed with two pairs of noise seeds keeps both results; the table and the figures tell them
    apart (with one pair, nothing is added)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    a = instability(exp, 0, 1, points=3)  # the default pair
    b = instability(exp, 0, 1, noise_seeds=(1, 2), points=3)
    sdir = os.path.join(exp.round_dir(0, 1), "stability")
    assert sorted(f for f in os.listdir(sdir) if f.endswith(".json")) == ["stability.json",
                                                                         "stability_noise_1_2.json"]
    assert instability(exp, 0, 1, points=3) == a  # read back, not overwritten by the second pair
    results = stability.load_stability(exp.dir)
    assert sorted(tuple(d["noise_seeds"]) for d in results) == sorted([tuple(a["noise_seeds"]), (1, 2)])
    labels = sorted(g[0] for g in stability._groups(results))
    assert labels == sorted([f"seed 0, noise seeds {','.join(map(str, a['noise_seeds']))}",
                             "seed 0, noise seeds 1,2"])
    md = stability.stability_markdown(results)
    assert "| imp | 0 | 0 (noise seeds 1,2) | 1 |" in md
    assert "noise seeds" not in stability.stability_markdown([b])


def test_tables_name_the_folder_where_two_experiments_share_a_control():
    """stability.md and landscape.md: the "experiment" cell is the control, and the folder's name too where
    another experiment of that control and rewind iteration is in the table (layer-wise and global IMP showed
    two rows "| imp | 0 | 0 | 1 |" that nothing told apart)."""
    from sparse_lth.landscape import landscape_markdown
    path = [dict(alpha=a, test_error=0.1, train_error=0.05) for a in (0.0, 0.5, 1.0)]
    row = dict(seed=0, round=1, rewind_iteration=0, percent_remaining=80.0, path=path, test_barrier=0.0,
               train_barrier=0.0, eigenvalues=[1.0], projected=None, final=dict(train_loss=0.1),
               distance_to_next=None, distance_to_next_relative=None)
    rows = [dict(row, experiment="imp_a", control="imp"), dict(row, experiment="imp_b", control="imp"),
            dict(row, experiment="reinit_c", control="reinit")]
    for md in (stability.stability_markdown(rows), landscape_markdown(rows)):
        cells = [ln.split(" | ")[0] for ln in md.splitlines()[2:]]
        assert cells == ["| imp (imp_a)", "| imp (imp_b)", "| reinit"], md
    alone = stability.stability_markdown(rows[:1] + rows[2:])
    assert [ln.split(" | ")[0] for ln in alone.splitlines()[2:]] == ["| imp", "| reinit"]
    # a bf16 and an fp32 run side by side: each row says its precision (a result without one is fp32)
    mixed = [dict(row, experiment="imp_a", control="imp"), dict(row, experiment="imp_b", control="imp",
                                                                 precision="bf16")]
    for md in (stability.stability_markdown(mixed), landscape_markdown(mixed)):
        assert [ln.split(" | ")[0] for ln in md.splitlines()[2:]] == ["| imp (imp_a) [fp32]",
                                                                      "| imp (imp_b) [bf16]"], md


def _round_one_with_pair(tmp_path):
    """A one-round IMP run and the instability of its round 1 with noise seeds (1, 2): (experiment, result,
    the round's stability folder)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    b = instability(exp, 0, 1, noise_seeds=(1, 2), points=3)
    return exp, b, os.path.join(exp.round_dir(0, 1), "stability")


def test_a_result_written_before_each_pair_had_its_file_is_read_back(tmp_path, monkeypatch):
    """Before, every pair of noise seeds was written to stability.json. Such a file is read back for its pair
    (nothing trained, one row); a new result for that pair replaces it (still one row)."""
    exp, b, sdir = _round_one_with_pair(tmp_path)
    os.replace(os.path.join(sdir, "stability_noise_1_2.json"), os.path.join(sdir, "stability.json"))  # as before
    monkeypatch.setattr(stability, "train", lambda *a, **kw: pytest.fail("trained again"))
    assert instability(exp, 0, 1, noise_seeds=(1, 2), points=3) == b
    assert len(stability.load_stability(exp.dir)) == 1
    c = instability(exp, 0, 1, noise_seeds=(1, 2), points=5)  # other settings: the saved copies, a new path
    assert len(c["path"]) == 5 and [d["path"] for d in stability.load_stability(exp.dir)] == [c["path"]]
    assert sorted(f for f in os.listdir(sdir) if f.endswith(".json")) == ["stability_noise_1_2.json"]


def test_legacy_results_survive_a_default_run_and_are_not_counted_twice(tmp_path, monkeypatch):
    exp, b, sdir = _round_one_with_pair(tmp_path)
    own, legacy = os.path.join(sdir, "stability_noise_1_2.json"), os.path.join(sdir, "stability.json")
    shutil.copyfile(own, legacy)  # both files, as an older version and this one would leave them
    assert len(stability.load_stability(exp.dir)) == 1
    os.remove(own)  # only the legacy file: the default pair's result moves it to its own file first
    a = instability(exp, 0, 1, points=3)
    assert a["noise_seeds"] != [1, 2] and os.path.exists(own)
    monkeypatch.setattr(stability, "train", lambda *a, **kw: pytest.fail("trained again"))
    assert instability(exp, 0, 1, noise_seeds=(1, 2), points=3) == b
    assert sorted(tuple(d["noise_seeds"]) for d in stability.load_stability(exp.dir)) == sorted(
        [tuple(a["noise_seeds"]), (1, 2)])


def test_a_bf16_run_is_evaluated_in_bf16(tmp_path, monkeypatch):
    """The copies and the points on the path are evaluated under the autocast the run trains and evaluates in
    (a bf16 run's barriers and copy accuracies were measured in fp32, beside round metrics measured in bf16)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1, precision="bf16")
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    seen = []
    real = stability.evaluate

    def spy(model, batches):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(model, batches)

    monkeypatch.setattr(stability, "evaluate", spy)
    instability(exp, 0, 1, points=3)
    assert seen and all(seen), seen


def test_a_bf16_path_evaluates_each_point_with_its_own_weights(tmp_path):
    """Autocast keeps a cast copy of each leaf weight until its outermost context exits: the points of the path,
    loaded in place under one context, were all evaluated with the first point's weights, and every bf16 barrier
    on the dense path (or with masked layers) read 0. The ends of the path are the two copies."""
    data = tiny_data(240, 120)
    for kw in (dict(), dict(layer_impl="masked")):
        hp = tiny_hp(rounds=1, precision="bf16", **kw)
        run_imp(hp, str(tmp_path / str(len(kw))), progress=False, data=data)
        exp = Experiment(hp, str(tmp_path / str(len(kw))), progress=False, data=data)
        res = instability(exp, 0, 1, points=5)
        a, b = res["copies"]
        path = res["path"]
        assert (a["test_acc"], a["test_loss"]) != (b["test_acc"], b["test_loss"])  # two copies that differ
        assert (path[0]["test_acc"], path[0]["test_loss"]) == (a["test_acc"], a["test_loss"]), kw
        assert (path[-1]["test_acc"], path[-1]["test_loss"]) == (b["test_acc"], b["test_loss"]), kw
        assert len({p["test_loss"] for p in path}) > 2, kw
    # a bf16 result of the version before is evaluated again (from the kept copies); fp32 results were right
    result_file = os.path.join(stability.stability_dir(exp, 0, 1), "stability.json")
    with open(result_file) as f:
        old = json.load(f)
    old.pop("precision")
    old["test_barrier"] = 0.0
    with open(result_file, "w") as f:
        json.dump(old, f)
    again = instability(exp, 0, 1, points=5)
    assert again["precision"] == "bf16" and again["test_barrier"] == res["test_barrier"]


def test_noise_seeds_are_distinct_across_replicates_and_from_run_seeds():
    """Each replicate's two copies draw their own noise: a base + 2 * seed + 2 made replicate s's second copy
    share its noise with replicate s + 1's first (the test compared seeds 0 and 1 only)."""
    seeds = [s for r in range(10) for s in noise_seeds_for(r)]
    assert len(set(seeds)) == 20 and not set(seeds) & set(range(10))


def test_stability_results_are_listed_by_seed_then_round(tmp_path):
    """Reports list rows by seed, then round (every other test used one seed: by round first passed)."""
    for s in (0, 1):
        for r in (0, 1):
            d = tmp_path / f"seed_{s}" / f"round_{r:02d}" / "stability"
            d.mkdir(parents=True)
            (d / "stability.json").write_text(json.dumps(dict(seed=s, round=r, noise_seeds=list(stability.noise_seeds_for(s)))))
    assert [(d["seed"], d["round"]) for d in stability.load_stability(str(tmp_path))] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_round_0_of_a_late_rewinding_run_without_its_rewind_point_is_refused_before_anything_is_written(tmp_path):
    """Round 0 starts from rewind.pt when the run rewinds late: without it the analysis is refused clearly (the
    check for round 0 was untested: without it torch.load failed after the analysis folder was made)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=0, rewind="5it")
    run_imp(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, checkpoint_every=5, data=data)
    os.remove(os.path.join(exp.seed_dir(0), "rewind.pt"))
    with pytest.raises(FileNotFoundError, match=r"needs \[.*rewind.pt'\]: run the IMP"):
        instability(exp, 0, 0, noise_seeds=(0, 11), points=3)
    assert not os.path.exists(stability.stability_dir(exp, 0, 0))

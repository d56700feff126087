"""IMP driver: pruning counts, rewinding, the controls, run folders, resume after a crash or SIGKILL, and refusal of
bad hyperparameters. Tiny LeNet (width 0.1: 784-30-10-10) on a small synthetic learnable data set."""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_data
from sparse_lth._files import canonical_steps
from sparse_lth.imp import (NOT_HASHED, Experiment, ImpHparams, apply_masks, experiment_name, hparams_dict,
                            load_ticket, magnitude_prune, non_default, prunable_layers, random_masks, run_imp)
from sparse_lth.presets import PRESET_NAMES, get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")




def tiny_hp(**kw) -> ImpHparams:
    base = dict(model="lenet300_100", width=0.1, optimizer="adam", lr=3e-3, batch_size=16, iterations="20it",
                eval_every=5, train_eval_size=64, rounds=3, prune_fc=0.2, prune_output=0.1, layer_impl="sparse",
                path="dense" if kw.get("layer_impl", "sparse") == "sparse" else "auto")  # masked layers: no path
    base.update(kw)
    return ImpHparams(**base)


def run(hp, root, **kw):
    kw.setdefault("data", tiny_data(240, 120))
    return run_imp(hp, str(root), progress=False, checkpoint_every=kw.pop("checkpoint_every", 5), **kw)


def load_masks(exp_dir, seed, r):
    return torch.load(os.path.join(exp_dir, f"seed_{seed}", f"round_{r:02d}", "masks.pt"), weights_only=False)["masks"]


def strip_times(m):
    """A round's metrics without what says how it ran rather than what it computed (times, a resume's iteration)."""
    return {k: v for k, v in m.items() if k not in ("wall_time", "step_time", "time_per_step", "resumed_from")}


def expected_live(total, p, r):
    live = total
    for _ in range(r):
        live -= int(math.floor(p * live + 0.5))
    return live


# --------------------------------------------------------------------------------------------------- pruning
def test_magnitude_prune_removes_smallest_surviving():
    w = {"a": torch.tensor([[0.5, -0.1, 0.3], [-0.05, 0.9, 0.2]]), "b": torch.tensor([[1.0, -2.0], [0.01, 3.0]])}
    m = {"a": torch.tensor([[True, True, True], [False, True, True]]), "b": torch.ones(2, 2, dtype=torch.bool)}
    out = magnitude_prune(w, m, {"a": 0.4, "b": 0.5})
    # a: 5 survivors, prune round(2.0)=2 smallest: -0.1 and 0.2; the already-pruned -0.05 stays pruned
    assert out["a"].tolist() == [[True, False, True], [False, True, False]]
    assert out["b"].tolist() == [[False, True], [False, True]]
    # global pool: the 3 smallest of all 9 survivors are 0.01, -0.1, 0.2
    g = magnitude_prune(w, m, {"a": 1 / 3, "b": 1 / 3}, [["a", "b"]])
    assert g["a"].tolist() == [[True, False, True], [False, True, False]]
    assert g["b"].tolist() == [[True, True], [False, True]]
    with pytest.raises(ValueError, match="different fractions"):
        magnitude_prune(w, m, {"a": 0.1, "b": 0.2}, [["a", "b"]])


def test_random_masks_exact_counts():
    g = torch.Generator().manual_seed(0)
    out = random_masks({"a": (7, 9), "b": (3, 4, 2)}, {"a": 20, "b": 0}, g)
    assert out["a"].sum() == 20 and out["a"].shape == (7, 9) and out["b"].sum() == 0
    with pytest.raises(ValueError):
        random_masks({"a": (2, 2)}, {"a": 5}, g)


def test_layerwise_counts_follow_rate_and_masks_only_lose(tmp_path):
    res = run(tiny_hp(rounds=3), tmp_path)
    ms = res.metrics[0]
    assert [m["round"] for m in ms] == [0, 1, 2, 3]
    prev = None
    for r, m in enumerate(ms):
        masks = load_masks(res.experiment_dir, 0, r)
        for name, info in m["remaining"].items():
            p = 0.1 if name == "fc3" else 0.2
            assert info["live"] == expected_live(info["total"], p, r) == int(masks[name].sum())
            assert abs(info["live"] - (1 - p) ** r * info["total"]) <= r  # (1-p)^k up to rounding
        if prev is not None:
            for name in masks:
                assert not (masks[name] & ~prev[name]).any(), "a pruned weight came back"
        prev = masks
    assert ms[0]["percent_remaining"] == 100.0 and ms[3]["percent_remaining"] < ms[2]["percent_remaining"]
    for m in ms:  # metrics recorded
        assert 0 <= m["test_acc"] <= 1 and m["early_stop_iteration"] in [c["iteration"] for c in m["curve"]]
        assert set(m["paths"].values()) == {"dense"} and m["backends"]["fc1"] == "torch"
        assert m["time_per_step"] > 0 and m["wall_time"] > 0


def test_global_pruning_total_follows_rate(tmp_path):
    res = run(tiny_hp(rounds=2, prune_global=True, prune_fc=0.3), tmp_path)
    for r, m in enumerate(res.metrics[0]):
        fc = [m["remaining"][n] for n in ("fc1", "fc2")]
        live, total = sum(i["live"] for i in fc), sum(i["total"] for i in fc)
        assert live == expected_live(total, 0.3, r)
        assert m["remaining"]["fc3"]["live"] == expected_live(100, 0.1, r)
    last = res.metrics[0][-1]["remaining"]
    assert last["fc1"]["density"] != pytest.approx(last["fc2"]["density"], abs=1e-3)  # one threshold, not per layer


def test_another_prune_score_prunes_by_it_and_names_another_experiment(tmp_path):
    res = run(tiny_hp(rounds=2, prune_score="movement"), tmp_path)
    assert res.experiment_dir != run(tiny_hp(rounds=2), tmp_path).experiment_dir
    sdir = os.path.join(res.experiment_dir, "seed_0")
    start = torch.load(os.path.join(sdir, "rewind.pt"), weights_only=False)
    for r in (1, 2):
        final = torch.load(os.path.join(sdir, f"round_{r - 1:02d}", "final.pt"), weights_only=False)
        prev, masks = load_masks(res.experiment_dir, 0, r - 1), load_masks(res.experiment_dir, 0, r)
        for n in masks:  # every survivor moved at least as far as every weight pruned this round
            moved = (final[f"{n}.weight"] - start[f"{n}.weight"]).abs()
            gone = prev[n] & ~masks[n]
            assert gone.any() and moved[masks[n]].min() >= moved[gone].max()
    with pytest.raises(ValueError, match="unknown prune_score 'gradient'"):
        run(tiny_hp(prune_score="gradient"), tmp_path)


def test_dense_layers_and_zero_rate_stay_dense(tmp_path):
    res = run(tiny_hp(rounds=2, dense_layers=("fc2",), prune_output=0.0), tmp_path)
    last = res.metrics[0][-1]["remaining"]
    assert last["fc2"]["density"] == 1.0 and last["fc3"]["density"] == 1.0 and last["fc1"]["density"] < 0.7


# --------------------------------------------------------------------------------------------------- rewinding
@pytest.mark.parametrize("rewind,k", [("0it", 0), ("6it", 6)])
def test_rewind_restores_weights_of_iteration_k(tmp_path, rewind, k):
    captured, starts = {}, {}

    def cb(r, it, model):
        if r == 0 and it == k:
            captured["w"] = {n: m.dense_weight().detach().clone() for n, m in prunable_layers(model)}
            captured["b"] = {n: m.bias.detach().clone() for n, m in prunable_layers(model)}

    def on_start(r, model):
        starts[r] = {n: (m.dense_weight().detach().clone(), m.mask.clone()) for n, m in prunable_layers(model)}
        starts[r, "b"] = {n: m.bias.detach().clone() for n, m in prunable_layers(model)}

    res = run(tiny_hp(rounds=2, rewind=rewind), tmp_path, callback=cb, on_round_start=on_start)
    if k == 0:
        captured["w"] = {n: starts[0][n][0] for n in starts[0]}
        captured["b"] = starts[0, "b"]
    rewind_state = torch.load(os.path.join(res.experiment_dir, "seed_0", "rewind.pt"), weights_only=False)
    for r in (1, 2):
        assert res.metrics[0][r]["start_iteration"] == k
        for n, b in starts[r, "b"].items():  # the biases too
            assert torch.equal(b, captured["b"][n]) and torch.equal(b, rewind_state[f"{n}.bias"])
        for n, (w, mask) in starts[r].items():
            assert mask.sum() < mask.numel() or n == "fc3"
            assert torch.equal(w[mask], captured["w"][n][mask])  # live weights: exactly their values at k
            assert torch.equal(w[mask], rewind_state[f"{n}.weight"][mask])
            assert (w[~mask] == 0).all()


# --------------------------------------------------------------------------------------------------- controls
def test_reinit_keeps_masks_changes_values_and_random_prune_keeps_sparsity(tmp_path):
    data = tiny_data(240, 120)
    imp_starts, re_starts, rp_starts = {}, {}, {}

    def grab(store):
        return lambda r, model: store.__setitem__(r, {n: m.dense_weight().detach().clone()
                                                      for n, m in prunable_layers(model)})
    imp = run(tiny_hp(rounds=2), tmp_path, data=data, on_round_start=grab(imp_starts))
    with pytest.raises(FileNotFoundError, match="IMP ticket"):  # reinit without its ticket
        run(tiny_hp(rounds=2, control="reinit", lr=1e-3), tmp_path, data=data)
    re = run(tiny_hp(rounds=2, control="reinit"), tmp_path, data=data, on_round_start=grab(re_starts))
    rp = run(tiny_hp(rounds=2, control="random_prune"), tmp_path, data=data, on_round_start=grab(rp_starts))
    assert len({imp.experiment_dir, re.experiment_dir, rp.experiment_dir}) == 3
    for r in (1, 2):
        mi, mr, mp = (load_masks(e.experiment_dir, 0, r) for e in (imp, re, rp))
        for n in mi:
            assert torch.equal(mi[n], mr[n])                       # reinit: the ticket's masks
            assert mp[n].sum() == mi[n].sum()                      # random pruning: the ticket's sparsity
            assert not torch.equal(mp[n], mi[n])                   # ... but another mask
            live = mi[n]
            assert not torch.equal(re_starts[r][n][live], imp_starts[r][n][live])  # fresh values
            assert (re_starts[r][n][~live] == 0).all()
            assert torch.equal(rp_starts[r][n][mp[n]], imp_starts[0][n][mp[n]])    # rewound to theta_0
        assert re.metrics[0][r]["remaining"] == imp.metrics[0][r]["remaining"]


def test_noise_control_adds_gaussian_noise_to_the_ticket(tmp_path):
    """control noise: the ticket's masks, θk plus N(0, (sigma * std of the layer's θ0)^2) on the live weights,
    drawn anew each round; sigma is part of the experiment."""
    data = tiny_data(240, 120)
    imp_starts, nz_starts = {}, {}

    def grab(store):
        return lambda r, model: store.__setitem__(r, {n: m.dense_weight().detach().clone()
                                                      for n, m in prunable_layers(model)})
    hp = tiny_hp(rounds=2, width=0.5)  # 784-150-50-10: enough weights per layer for the statistics
    imp = run(hp, tmp_path, data=data, on_round_start=grab(imp_starts))
    nz = run(dataclasses.replace(hp, control="noise", noise_std=2.0), tmp_path, data=data,
             on_round_start=grab(nz_starts))
    nz1 = run(dataclasses.replace(hp, control="noise", noise_std=1.0), tmp_path, data=data)
    assert len({imp.experiment_dir, nz.experiment_dir, nz1.experiment_dir}) == 3
    init = torch.load(os.path.join(imp.experiment_dir, "seed_0", "init.pt"), weights_only=False)
    assert nz.metrics[0][0]["reused_from"]  # the dense round is the IMP run's
    for r in (1, 2):
        mi, mn = load_masks(imp.experiment_dir, 0, r), load_masks(nz.experiment_dir, 0, r)
        for n in mi:
            assert torch.equal(mi[n], mn[n])                       # the ticket's masks
            live = mi[n]
            assert (nz_starts[r][n][~live] == 0).all()
            diff = (nz_starts[r][n] - imp_starts[r][n])[live].double()
            want = 2.0 * init[f"{n}.weight"].double().std().item()
            assert diff.std().item() == pytest.approx(want, rel=0.15) and abs(diff.mean().item()) < 0.2 * want
    d1 = (nz_starts[1]["fc1"] - imp_starts[1]["fc1"])[load_masks(imp.experiment_dir, 0, 2)["fc1"]]
    d2 = (nz_starts[2]["fc1"] - imp_starts[2]["fc1"])[load_masks(imp.experiment_dir, 0, 2)["fc1"]]
    assert not torch.allclose(d1, d2)  # new noise each round
    # the report names the noise level of each noise experiment
    from sparse_lth.report import write_report
    files = write_report([imp.experiment_dir, nz.experiment_dir, nz1.experiment_dir], str(tmp_path / "rep"))
    text = open(files["summary"]).read()
    assert "σ = 1 x init std" in text and "σ = 2 x init std" in text


def test_controls_reuse_the_dense_round_of_the_imp_run(tmp_path):
    """A control's round 0 is the IMP run's (same θ0, same training): taken from it, not trained again, with the
    very metrics (and rewind point) that training it here gives."""
    data = tiny_data(240, 120)
    hp = dict(rounds=1, rewind="5it")
    imp = run(tiny_hp(**hp), tmp_path, data=data)
    trained = run(tiny_hp(control="random_prune", reuse_dense_round=False, **hp), tmp_path, data=data)
    rewind_trained = torch.load(os.path.join(trained.experiment_dir, "seed_0", "rewind.pt"), weights_only=False)
    shutil.rmtree(trained.experiment_dir)
    starts = []
    reused = run(tiny_hp(control="random_prune", **hp), tmp_path, data=data,
                 on_round_start=lambda r, m: starts.append(r))
    assert reused.experiment_dir == trained.experiment_dir     # reuse_dense_round is not part of the hash
    assert starts == [1]                                       # round 0 was not trained
    m0 = reused.metrics[0][0]
    assert m0["control"] == "random_prune"
    assert m0["reused_from"] == os.path.relpath(os.path.join(imp.experiment_dir, "seed_0", "round_00"),
                                                reused.experiment_dir)
    for a, b in zip(trained.metrics[0], reused.metrics[0]):
        b = {k: v for k, v in b.items() if k != "reused_from"}
        assert strip_times(a) == strip_times(b)
    rewind = torch.load(os.path.join(reused.experiment_dir, "seed_0", "rewind.pt"), weights_only=False)
    assert rewind.keys() == rewind_trained.keys() and all(torch.equal(rewind[k], rewind_trained[k]) for k in rewind)
    # another θ0 in the IMP run (say, the model code changed in between): round 0 is trained here
    shutil.rmtree(reused.experiment_dir)
    init = os.path.join(imp.experiment_dir, "seed_0", "init.pt")
    state = torch.load(init, weights_only=False)
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] + 1.0
    torch.save(state, init)
    starts.clear()
    again = run(tiny_hp(control="random_prune", **hp), tmp_path, data=data,
                on_round_start=lambda r, m: starts.append(r))
    assert starts == [0, 1] and "reused_from" not in again.metrics[0][0]


def test_oneshot_hits_target(tmp_path):
    res = run(tiny_hp(control="oneshot", oneshot_remaining=0.25, rounds=5), tmp_path)
    assert [m["round"] for m in res.metrics[0]] == [0, 1]
    last = res.metrics[0][1]
    for n, info in last["remaining"].items():
        assert abs(info["live"] - 0.25 * info["total"]) <= 0.5 + 1e-9
    res2 = run(tiny_hp(control="oneshot", rounds=6), tmp_path / "b")  # default target: what 6 IMP rounds keep
    for n, info in res2.metrics[0][1]["remaining"].items():
        p = 0.1 if n == "fc3" else 0.2
        assert info["live"] == expected_live(info["total"], p, 6)  # exactly (fc2: 78, where 0.8^6 rounds to 79)


@pytest.mark.parametrize("prune_global", [False, True])
def test_oneshot_at_each_level_prunes_the_dense_network_to_imp_counts(tmp_path, prune_global):
    data = tiny_data(240, 120)
    hp = dict(rounds=3, prune_global=prune_global, prune_fc=0.3)
    imp = run(tiny_hp(**hp), tmp_path, data=data)
    starts = {}
    res = run(tiny_hp(control="oneshot", oneshot_levels=True, **hp), tmp_path, data=data,
              on_round_start=lambda r, m: starts.__setitem__(r, {n: l.dense_weight().detach().clone()
                                                                 for n, l in prunable_layers(m)}))
    assert [m["round"] for m in res.metrics[0]] == [0, 1, 2, 3]
    assert "reused_from" in res.metrics[0][0] and sorted(starts) == [1, 2, 3]  # round 0 is the IMP run's
    dense = torch.load(os.path.join(imp.experiment_dir, "seed_0", "round_00", "final.pt"), weights_only=False)
    init = torch.load(os.path.join(imp.experiment_dir, "seed_0", "init.pt"), weights_only=False)
    prev = None
    for r in (1, 2, 3):
        mine, ticket = res.metrics[0][r]["remaining"], imp.metrics[0][r]["remaining"]
        # the same live counts as IMP's round r: per layer, or per pool with global pruning
        pools = [["fc1", "fc2"], ["fc3"]] if prune_global else [["fc1"], ["fc2"], ["fc3"]]
        for pool in pools:
            assert sum(mine[n]["live"] for n in pool) == sum(ticket[n]["live"] for n in pool)
        masks = load_masks(res.experiment_dir, 0, r)
        for pool in pools:  # survivors are the largest magnitudes of the DENSE network's trained weights
            kept = torch.cat([dense[f"{n}.weight"].abs()[masks[n]] for n in pool])
            gone = torch.cat([dense[f"{n}.weight"].abs()[~masks[n]] for n in pool])
            assert gone.numel() > 0 and kept.min() >= gone.max()
        for n in masks:  # rewound to θ0 (rewind 0) under the level's mask
            assert torch.equal(starts[r][n], init[f"{n}.weight"] * masks[n])
            assert prev is None or not (masks[n] & ~prev[n]).any()  # the levels nest
        prev = masks
    # not IMP: after round 1 the masks differ from the ticket's (IMP prunes each round's retrained weights)
    assert any(not torch.equal(load_masks(res.experiment_dir, 0, 3)[n], load_masks(imp.experiment_dir, 0, 3)[n])
               for n in prev)
    exp = Experiment(tiny_hp(control="oneshot", oneshot_levels=True, **hp), str(tmp_path), data=data)
    assert [exp.pruned_from(r) for r in range(4)] == [None, 0, 0, 0]
    assert [Experiment(tiny_hp(**hp), str(tmp_path), data=data).pruned_from(r) for r in range(3)] == [None, 0, 1]


def test_continue_keeps_trained_weights(tmp_path):
    starts = {}
    res = run(tiny_hp(rounds=2, control="continue"), tmp_path,
              on_round_start=lambda r, m: starts.__setitem__(r, {n: l.dense_weight().detach().clone()
                                                                 for n, l in prunable_layers(m)}))
    final0 = torch.load(os.path.join(res.experiment_dir, "seed_0", "round_00", "final.pt"), weights_only=False)
    masks = load_masks(res.experiment_dir, 0, 1)
    for n, w in starts[1].items():
        assert torch.equal(w, final0[f"{n}.weight"] * masks[n])


# --------------------------------------------------------------------------------------------------- run folders
def test_run_folder_named_by_nondefault_hparams_and_replicates(tmp_path):
    hp = tiny_hp(rounds=1)
    assert experiment_name(hp) == experiment_name(dataclasses.replace(hp, seed=5))
    assert experiment_name(hp) != experiment_name(dataclasses.replace(hp, lr=1e-3))
    assert "seed" not in non_default(dataclasses.replace(hp, seed=3)) and non_default(ImpHparams()) == {}
    res = run(hp, tmp_path, replicates=2)
    assert sorted(res.metrics) == [0, 1]
    assert res.experiment_dir == os.path.join(str(tmp_path), experiment_name(hp))
    with open(os.path.join(res.experiment_dir, "hparams.json")) as f:
        assert json.load(f)["lr"] == 3e-3
    m0, m1 = (load_masks(res.experiment_dir, s, 1) for s in (0, 1))
    assert not torch.equal(m0["fc1"], m1["fc1"])  # replicates differ
    # a finished round is skipped on re-run: no training step happens
    steps = []
    again = run(hp, tmp_path, replicates=2, callback=lambda r, it, m: steps.append(it))
    assert steps == [] and again.metrics == res.metrics


def test_resume_after_crash_gives_identical_result(tmp_path):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=2, path="sparse", dropout=0.2)  # sparse path, and dropout to exercise the RNG
    ref = run(hp, tmp_path / "ref", data=data)

    class Boom(RuntimeError):
        pass

    def crash(r, it, model):
        if r == 1 and it == 13:
            raise Boom()
    with pytest.raises(Boom):
        run(hp, tmp_path / "crash", data=data, callback=crash)
    exp = os.path.join(str(tmp_path / "crash"), experiment_name(hp))
    assert os.path.exists(os.path.join(exp, "seed_0", "round_01", "checkpoint.pt"))
    assert not os.path.exists(os.path.join(exp, "seed_0", "round_01", "metrics.json"))
    seen = []
    out = run(hp, tmp_path / "crash", data=data, callback=lambda r, it, m: seen.append((r, it)))
    assert seen[0] == (1, 11)  # resumed after the checkpoint at 10, round 0 skipped
    assert out.metrics[0][1]["resumed_from"] == 10 and ref.metrics[0][1]["resumed_from"] is None
    assert [strip_times(m) for m in out.metrics[0]] == [strip_times(m) for m in ref.metrics[0]]
    for r in range(3):
        a, b = load_masks(ref.experiment_dir, 0, r), load_masks(exp, 0, r)
        assert all(torch.equal(a[n], b[n]) for n in a)
    fa = torch.load(os.path.join(ref.experiment_dir, "seed_0", "round_02", "final.pt"), weights_only=False)
    fb = torch.load(os.path.join(exp, "seed_0", "round_02", "final.pt"), weights_only=False)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert out.metrics[0][1]["paths"]["fc1"] == "sparse"


def test_each_round_records_its_environment_and_a_round_under_other_numerics_warns(tmp_path):
    data = tiny_data(240, 120)
    out = run(tiny_hp(rounds=1), tmp_path / "ref", data=data)
    envs = [m["environments"] for m in out.metrics[0]]
    assert all(len(e) == 1 and e[0]["from_iteration"] == 0 for e in envs)
    assert envs[0][0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert envs[0][0]["threads"] == torch.get_num_threads() == 1

    class Boom(RuntimeError):
        pass

    def crash(r, it, model):
        if r == 1:
            raise Boom()
    hp = tiny_hp(rounds=1)
    with pytest.raises(Boom):
        run(hp, tmp_path / "crash", data=data, callback=crash)
    # as if round 0 had run on a CPU with another instruction set
    mpath = os.path.join(str(tmp_path / "crash"), experiment_name(hp), "seed_0", "round_00", "metrics.json")
    with open(mpath) as f:
        m = json.load(f)
    m["environments"][0]["cpu_capability"] = "OTHER"
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.warns(RuntimeWarning, match="seed 0 round 1 runs under other numerics than before: "
                                            "cpu_capability OTHER -> "):
        run(hp, tmp_path / "crash", data=data)


# The same experiment run in a subprocess that is SIGKILLed mid-round.
_CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import test_imp as t
def slow(r, it, m):
    if r == 1:
        time.sleep(0.05)
t.run(t.tiny_hp(rounds=1, iterations="40it"), {root!r}, callback=slow)
"""


def test_resume_after_sigkill(tmp_path):
    hp = tiny_hp(rounds=1, iterations="40it")
    ref = run(hp, tmp_path / "ref")
    root = str(tmp_path / "killed")
    exp = os.path.join(root, experiment_name(hp))
    ck = os.path.join(exp, "seed_0", "round_01", "checkpoint.pt")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=os.path.join(REPO, "tests"), root=root)])
    try:
        deadline = time.time() + 300  # (a loaded machine: importing torch alone took tens of seconds)
        while not os.path.exists(ck) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(ck), "the child never wrote a mid-round checkpoint"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # a failed wait above: the child must not outlive the test (nor hide its error)
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(exp, "seed_0", "round_01", "metrics.json"))
    seen = []
    out = run(hp, root, callback=lambda r, it, m: seen.append((r, it)))
    assert seen and seen[0][0] == 1 and seen[0][1] > 5  # resumed mid-round
    assert [strip_times(m) for m in out.metrics[0]] == [strip_times(m) for m in ref.metrics[0]]
    a, b = load_masks(ref.experiment_dir, 0, 1), load_masks(exp, 0, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,msg", [
    (dict(prune_fc=1.0), "prune_fc"),
    (dict(prune_fc=1.5), "prune_fc"),
    (dict(prune_output=-0.1), "prune_output"),
    (dict(model="lenet5"), "unknown model"),
    (dict(control="magic"), "unknown control"),
    (dict(rewind="20it"), "rewind point"),
    (dict(rewind="3ep"), "rewind point"),
    (dict(rewind="soon"), "rewind"),
    (dict(iterations="ten"), "iterations"),
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(lr=-1.0), "lr"),
    (dict(dense_layers=("fc9",)), "dense_layers"),
    (dict(control="oneshot", oneshot_remaining=1.2), "oneshot_remaining"),
    (dict(oneshot_levels=True), "only used with control 'oneshot'"),
    (dict(control="oneshot", oneshot_levels=True, oneshot_remaining=0.5), "takes no oneshot_remaining"),
    (dict(control="oneshot", rounds=0), "with rounds=0 it would prune nothing"),
    (dict(control="oneshot", oneshot_levels=True, rounds=0), "with rounds=0 it would prune nothing"),
    (dict(seed=10 ** 23), r"seed must be an integer in \[-2\*\*40, 2\*\*40\)"),
    (dict(seed=-2 ** 40 - 1), "seed must be an integer"),
    (dict(prune_fc=0.0, prune_output=0.0), "no layer would be pruned"),
    (dict(layer_impl="fast"), "layer_impl"),
    (dict(control="noise"), "noise_std > 0"),
    (dict(control="noise", noise_std=float("nan")), "noise_std > 0"),
    (dict(noise_std=0.5), "only used with control 'noise'"),
    (dict(backend="warp"), "unknown backend"),
    (dict(backend="triton"), "needs CUDA tensors"),
])
def test_bad_hparams_refused_before_training(tmp_path, kw, msg):
    steps = []
    with pytest.raises(ValueError, match=msg):
        run(tiny_hp(**kw), tmp_path, callback=lambda r, it, m: steps.append(it))
    assert steps == [] and not os.path.exists(tmp_path / "x") and list(tmp_path.iterdir()) == []


def test_run_folder_from_before_a_new_hyperparameter_still_resumes(tmp_path):
    """hparams.json written before a field existed (here noise_std) is the same experiment: the field had its
    default, which the folder's hash leaves out."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    res = run(hp, tmp_path, data=data)
    path = os.path.join(res.experiment_dir, "hparams.json")
    with open(path) as f:
        d = json.load(f)
    del d["noise_std"]
    with open(path, "w") as f:
        json.dump(d, f)
    again = run(hp, tmp_path, data=data)
    assert again.experiment_dir == res.experiment_dir and strip_times(again.metrics[0][1]) == strip_times(
        res.metrics[0][1])
    with pytest.raises(ValueError, match="holds another experiment"):  # a real difference is still refused
        d["lr"] = 1.0
        with open(path, "w") as f:
            json.dump(d, f)
        run(hp, tmp_path, data=data)


def test_run_folder_of_another_experiment_refused(tmp_path):
    hp = tiny_hp(rounds=1)
    res = run(hp, tmp_path)
    with pytest.raises(ValueError, match="another experiment"):
        run(dataclasses.replace(hp, lr=1e-2), tmp_path, run_dir=res.experiment_dir)


def test_presets():
    assert "lenet_quick" in PRESET_NAMES and "resnet20_warmup" in PRESET_NAMES
    full = get_preset("lenet300_100")
    assert (full.optimizer, full.lr, full.batch_size, full.iterations, full.prune_fc, full.prune_output,
            full.rewind) == ("adam", 1.2e-3, 60, "50000it", 0.2, 0.1, "0it")
    r = get_preset("resnet20_warmup")
    assert (r.optimizer, r.momentum, r.lr, r.warmup, r.milestones, r.prune_fc, r.prune_conv, r.prune_global) == \
        ("sgd", 0.9, 0.03, 20000, (20000, 25000), 0.0, 0.2, True)
    assert get_preset("lenet_quick", rounds=2).rounds == 2
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("lenet_slow")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        get_preset("lenet_quick", speed=3)


def test_apply_masks_checks_input():
    from sparse_lth.models import build_model
    model = build_model("lenet300_100", width=0.1, seed=0)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_layers(model)}
    with pytest.raises(ValueError, match="missing"):
        apply_masks(model, {k: v for k, v in masks.items() if k != "fc2"})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {**masks, "fc2": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        apply_masks(model, {**masks, "fc2": masks["fc2"].float()})
    masks["fc1"][0, :5] = False
    apply_masks(model, masks)  # plain layers: weight_mask buffer, pruned weights zeroed
    assert (model.fc1.weight[0, :5] == 0).all() and model.fc1.weight_mask.dtype == torch.bool


def test_ops_hparam_reaches_the_layers_and_is_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown op"):
        run(tiny_hp(ops="backward=dense"), tmp_path / "bad")
    out = run(tiny_hp(rounds=1, path="sparse", ops="weight_grad=dense,forward=dense"), tmp_path / "ops")
    for m in out.metrics[0]:
        assert set(m["paths"].values()) == {"sparse/forward:dense/weight_grad:dense"}
    assert "ops" in non_default(tiny_hp(ops="dense")) and "ops" not in non_default(tiny_hp())
    timed = run(tiny_hp(rounds=1, path="auto", timed_paths=True), tmp_path / "timed")
    assert set(timed.metrics[0][1]["paths"]) == {"fc1", "fc2", "fc3"}
    # a finished round loaded for analysis or export goes on the paths it recorded: no timing, so no data needed
    # (load_ticket of a timed run read the data to time the layers again, and could choose other paths)
    from sparse_lth.train import layer_paths
    for r in (0, 1):
        model = load_ticket(timed.experiment_dir, r, data_root=str(tmp_path / "no_data_here"))
        assert layer_paths(model) == timed.metrics[0][r]["paths"]


def test_step_counts_name_one_experiment_however_written(tmp_path):
    a = tiny_hp()
    for kw in (dict(iterations="20"), dict(iterations=20), dict(iterations=" 20IT "), dict(rewind="0"),
               dict(rewind=0), dict(rewind="0ep")):
        assert experiment_name(tiny_hp(**kw)) == experiment_name(a), kw
    assert [canonical_steps(v) for v in ("2.0ep", "1e2", "1000.125ep", "1234567ep", "2.5")] == \
        ["2ep", "100it", "1000.125ep", "1234567ep", "2.5"]  # exact: no digit of a budget is rounded away
    assert experiment_name(tiny_hp(iterations="21it")) != experiment_name(a)
    for bad in ("2.5", "inf", "1e400it"):  # still refused clearly
        with pytest.raises(ValueError, match="iterations must look like"):
            run(tiny_hp(iterations=bad), tmp_path)


def test_a_folder_named_before_step_counts_had_one_spelling_is_resumed(tmp_path):
    """Before, "20" and "20it" named two folders: an experiment written as "20" then lives under the old name,
    which is found (and reused, not trained again), and the same experiment written "20it" is accepted in it."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1, iterations="20")
    # the name the older version gave it: the hash of the non-default values as written
    ref = hparams_dict(ImpHparams())
    raw = {k: v for k, v in hparams_dict(hp).items() if k not in NOT_HASHED and v != ref[k]}
    old = tmp_path / f"lenet300_100_imp_{hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]}"
    assert old.name != experiment_name(hp)
    first = run(hp, tmp_path, data=data, run_dir=str(old))
    steps = []
    for spelled in ("20", "20it", 20, "2e1"):  # found however it is written now
        again = run(dataclasses.replace(hp, iterations=spelled), tmp_path, data=data,
                    callback=lambda r, it, m: steps.append(it))
        assert again.experiment_dir == str(old) and steps == [] and again.metrics == first.metrics, spelled
    ctl = run(dataclasses.replace(hp, iterations="20it", control="reinit"), tmp_path, data=data)
    assert ctl.metrics[0][0]["reused_from"].startswith(os.path.join("..", old.name))  # the control finds it too


def test_control_without_its_source_is_refused_before_training(tmp_path):
    steps = []
    for control in ("reinit", "noise"):
        with pytest.raises(FileNotFoundError, match="--source"):
            run(tiny_hp(control=control, noise_std=1.0 if control == "noise" else 0.0), tmp_path,
                callback=lambda r, it, m: steps.append(it))
    assert steps == [] and list(tmp_path.iterdir()) == []


def test_control_finds_an_imp_run_in_a_folder_of_its_own(tmp_path):
    """IMP in a folder named with run_dir (the CLI's --run-dir), its control pointed at it with source_dir
    (--source): round 0 is reused and the ticket's masks are trained; a folder of another experiment is refused."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    src = str(tmp_path / "my_imp")
    imp = run(hp, tmp_path, data=data, run_dir=src)
    ctl = run(dataclasses.replace(hp, control="reinit"), tmp_path, data=data, source_dir=src)
    assert ctl.metrics[0][0]["reused_from"] == os.path.relpath(os.path.join(src, "seed_0", "round_00"),
                                                                ctl.experiment_dir)
    masks = [torch.load(os.path.join(d, "seed_0", "round_01", "masks.pt"), weights_only=False)["masks"]
             for d in (imp.experiment_dir, ctl.experiment_dir)]
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    # the source named as what is wrong (it said "run folder ... holds another experiment; choose another folder")
    with pytest.raises(ValueError, match=r"source .*my_imp is not the IMP run of this reinit control's "
                                         r"hyperparameters \(they differ in \['lr'\]\)"):
        run(dataclasses.replace(hp, control="reinit", lr=1e-2), tmp_path, data=data, source_dir=src)
    with pytest.raises(ValueError, match=r"not the IMP run .*differ in \['control'"):  # a control's folder as source
        run(dataclasses.replace(hp, control="oneshot"), tmp_path, data=data, source_dir=ctl.experiment_dir)
    with pytest.raises(FileNotFoundError, match="is not an experiment folder"):  # a mistyped --source, any control
        run(dataclasses.replace(hp, control="oneshot"), tmp_path, data=data, source_dir=src + "_typo")
    # and the plan refuses what the run refuses (it failed on the missing hparams.json's path)
    with pytest.raises(FileNotFoundError, match="is not an experiment folder"):
        Experiment(dataclasses.replace(hp, control="oneshot"), str(tmp_path), data=data,
                   source_dir=src + "_typo").plan()
    early = Experiment(dataclasses.replace(hp, control="reinit"), str(tmp_path / "elsewhere"), data=data).plan()
    assert "needs the IMP ticket's masks" in early["not_ready"]  # planned before its IMP run: said, not refused
    assert Experiment(dataclasses.replace(hp, control="reinit"), str(tmp_path), data=data,
                      source_dir=src).plan()["not_ready"] is None
    # started beside its IMP run, waiting for it: a source folder that does not exist yet is fine
    waiting = Experiment(dataclasses.replace(hp, control="reinit"), str(tmp_path), data=data,
                         source_dir=str(tmp_path / "not_yet"), wait_for_source=1)
    waiting._check_source([0])


def test_an_imp_variant_takes_the_dense_round_of_an_imp_run_that_prunes_otherwise(tmp_path):
    """An IMP run given another IMP run as source_dir (--source) that differs only in how it prunes takes that
    run's round 0 (the very round training gives here), then prunes by its own settings; a source that trains
    another dense network, or its own folder, is refused before anything is written."""
    data = tiny_data(240, 120)
    base = tiny_hp(rounds=1, rewind="5it")
    src = str(tmp_path / "base")
    imp = run(base, tmp_path, data=data, run_dir=src)
    variant = dataclasses.replace(base, rounds=2, prune_fc=0.5, prune_output=0.0, prune_global=True)
    starts = []
    trained = run(variant, tmp_path, data=data, on_round_start=lambda r, m: starts.append(r))  # no source
    assert starts == [0, 1, 2] and "reused_from" not in trained.metrics[0][0]
    shutil.rmtree(trained.experiment_dir)
    starts.clear()
    reused = run(variant, tmp_path, data=data, source_dir=src, on_round_start=lambda r, m: starts.append(r))
    assert reused.experiment_dir == trained.experiment_dir  # the source is not part of the experiment
    assert starts == [1, 2]                                 # round 0 was not trained
    assert reused.metrics[0][0]["reused_from"] == os.path.relpath(os.path.join(src, "seed_0", "round_00"),
                                                                   reused.experiment_dir)
    for a, b in zip(trained.metrics[0], reused.metrics[0]):  # then the same rounds as training it here gives
        assert strip_times(a) == strip_times({k: v for k, v in b.items() if k != "reused_from"})
    for f in ("init.pt", "rewind.pt", os.path.join("round_00", "final.pt")):
        a = torch.load(os.path.join(src, "seed_0", f), weights_only=False)
        b = torch.load(os.path.join(reused.experiment_dir, "seed_0", f), weights_only=False)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # its own pruning: fc3 (the output layer, rate 0) keeps every weight, fc1/fc2 lose half per round, pooled
    r1 = reused.metrics[0][1]["remaining"]
    assert r1["fc3"]["density"] == 1.0 and imp.metrics[0][1]["remaining"]["fc3"]["density"] < 1.0
    assert r1["fc1"]["live"] + r1["fc2"]["live"] == round(0.5 * (r1["fc1"]["total"] + r1["fc2"]["total"]))
    # a source that trains another dense network: refused, naming what differs; nothing written
    other = dataclasses.replace(variant, lr=1e-2)
    with pytest.raises(ValueError, match=r"another dense network: it differs in lr \(0.003 there, 0.01 here\)"):
        run(other, tmp_path, data=data, source_dir=src)
    assert not os.path.exists(Experiment(other, str(tmp_path), data=data).dir)
    # the same budget spelled otherwise ("5" for "5it") is the same dense network
    respelled = Experiment(dataclasses.replace(variant, rewind="5"), str(tmp_path), data=data, source_dir=src)
    assert respelled.dense_source().dir == src
    with pytest.raises(ValueError, match="own folder"):
        run(base, tmp_path, data=data, run_dir=src, source_dir=src)
    # --no-reuse-dense-round trains it anyway: a source given with it would go unused, and is refused (so is a
    # wait for a source that is not named); nothing written
    shutil.rmtree(reused.experiment_dir)
    starts.clear()
    no_reuse = dataclasses.replace(variant, reuse_dense_round=False)
    with pytest.raises(ValueError, match="only its dense round 0 from a source, and reuse_dense_round=False"):
        run(no_reuse, tmp_path, data=data, source_dir=src)
    with pytest.raises(ValueError, match=r"without source_dir \(--source\) has none"):
        run(variant, tmp_path, data=data, wait_for_source=5)
    assert not os.path.exists(reused.experiment_dir)
    run(no_reuse, tmp_path, data=data, on_round_start=lambda r, m: starts.append(r))
    assert starts == [0, 1, 2]


def test_an_imp_variant_waits_for_its_source(tmp_path):
    """Started beside its source with wait_for_source, an IMP variant waits for the source's folder and dense
    round and takes it; when the source never comes, it trains round 0 itself after the wait."""
    import threading
    data = tiny_data(240, 120)
    base = tiny_hp(rounds=1)
    src = str(tmp_path / "base")
    variant = dataclasses.replace(base, prune_fc=0.5)
    trained, out, errors = [], {}, []

    def start_variant():
        try:
            out["v"] = run(variant, tmp_path, data=data, source_dir=src, wait_for_source=120,
                           on_round_start=lambda r, m: trained.append(r))
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=start_variant)
    t.start()
    time.sleep(0.5)
    assert trained == [] and t.is_alive()  # waiting: no source folder yet
    imp = run(base, tmp_path, data=data, run_dir=src)
    t.join(timeout=120)
    assert not errors, errors
    assert trained == [1] and out["v"].metrics[0][0]["test_acc"] == imp.metrics[0][0]["test_acc"]
    shutil.rmtree(out["v"].experiment_dir)
    trained.clear()
    alone = run(variant, tmp_path, data=data, source_dir=str(tmp_path / "never"), wait_for_source=0.2,
                on_round_start=lambda r, m: trained.append(r))
    assert trained == [0, 1] and "reused_from" not in alone.metrics[0][0]


def test_a_control_started_beside_its_imp_run_waits_for_its_dense_round(tmp_path):
    """A control told to wait for its source, started before the IMP run has finished round 0, waits for that
    round and takes it (no second training of the same dense network), then the ticket's masks."""
    import threading
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    src = str(tmp_path / "imp")
    trained, out, errors = [], {}, []

    def control():
        try:
            out["ctl"] = run(dataclasses.replace(hp, control="reinit"), tmp_path, data=data, source_dir=src,
                             wait_for_source=120, on_round_start=lambda r, m: trained.append(r))
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=control)
    t.start()
    time.sleep(0.5)  # the control is waiting: no IMP folder yet
    assert trained == [] and t.is_alive()
    imp = run(hp, tmp_path, data=data, run_dir=src)
    t.join(timeout=120)
    assert not errors, errors
    assert trained == [1]  # round 0 was the IMP run's
    assert out["ctl"].metrics[0][0]["reused_from"] == os.path.relpath(os.path.join(src, "seed_0", "round_00"),
                                                                       out["ctl"].experiment_dir)
    assert out["ctl"].metrics[0][0]["test_acc"] == imp.metrics[0][0]["test_acc"]


def test_run_folder_that_is_no_experiment_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "lenet300_100_imp_0123456789").mkdir()  # a run root, say
    with pytest.raises(ValueError, match="not empty and holds no experiment"):
        run(tiny_hp(), tmp_path, run_dir=str(tmp_path / "runs"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run(tiny_hp(), tmp_path, run_dir=str(tmp_path / "afile"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "hparams.json.tmp4242").write_text("{")  # a kill while it was being written
    assert run(tiny_hp(rounds=0), tmp_path, run_dir=str(tmp_path / "empty")).experiment_dir.endswith("empty")


def test_missing_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_imp(tiny_hp(), str(tmp_path / "runs"), progress=False, data_root=str(tmp_path / "no_data"))
    assert not (tmp_path / "runs").exists()


def test_a_damaged_json_file_is_named(tmp_path):
    data = tiny_data(240, 120)
    res = run(tiny_hp(rounds=1), tmp_path, data=data)
    path = os.path.join(res.experiment_dir, "seed_0", "round_01", "metrics.json")
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        run(tiny_hp(rounds=1), tmp_path, data=data)


def test_a_conv_network_on_one_channel_28x28_data(tmp_path):
    """Conv-2 on Fashion-MNIST (or MNIST): the model is built for the dataset's (1, 28, 28) examples, and IMP
    prunes its conv layers at the conv rate and its fc layers at theirs."""
    hp = tiny_hp(model="conv2", dataset="fashion_mnist", width=0.125, prune_conv=0.1, rounds=1, iterations="4it",
                 eval_every=2)
    res = run(hp, tmp_path)
    masks = load_masks(res.experiment_dir, 0, 1)
    assert masks["features.conv1"].shape == (8, 1, 3, 3) and masks["fc1"].shape == (32, 8 * 14 * 14)
    left = {n: m.float().mean().item() for n, m in masks.items()}
    assert left["features.conv2"] == pytest.approx(0.9, abs=0.01) and left["fc1"] == pytest.approx(0.8, abs=0.01)
    assert left["fc3"] == pytest.approx(0.9, abs=0.02)
    kinds = {n: v["kind"] for n, v in res.metrics[0][1]["remaining"].items()}  # recorded for the report's axes
    assert kinds == {"features.conv1": "conv", "features.conv2": "conv", "fc1": "fc", "fc2": "fc", "fc3": "output"}
    from sparse_lth.cli import main
    assert main(["report", res.experiment_dir, "--remaining", "conv", "--out", str(tmp_path / "rep")]) == 0
    assert "% conv remaining" in (tmp_path / "rep" / "summary.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["report", res.experiment_dir, "--remaining", "linear"])
    assert e.value.code == 2


@pytest.mark.parametrize("control", ["imp", "reinit"])
def test_load_ticket_gives_the_rounds_network(tmp_path, control):
    """load_ticket: a finished round's model with its masks and the weights it started from (what the round
    trained from) or ended with (evaluated, the round's recorded test accuracy), read-only; clear errors."""
    from sparse_lth.imp import load_ticket
    from sparse_lth.layers import sparse_layers
    from sparse_lth.train import evaluate
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=2)
    imp = run(hp, tmp_path, data=data)
    res = imp if control == "imp" else run(dataclasses.replace(hp, control="reinit"), tmp_path, data=data)
    d = res.experiment_dir
    before = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
    masks = load_masks(d, 0, 2)
    final = load_ticket(d, 2, weights="final")
    assert {n: m.weight_mask.cpu() for n, m in sparse_layers(final)}.keys() == masks.keys()
    assert all(torch.equal(m.weight_mask.cpu(), masks[n]) for n, m in sparse_layers(final))
    _, acc = evaluate(final, data[1].eval_batches(1000))
    assert acc == pytest.approx(res.metrics[0][2]["test_acc"], abs=1e-9)
    saved = torch.load(os.path.join(d, "seed_0", "round_02", "final.pt"), weights_only=False)
    for n, m in sparse_layers(final):
        assert torch.equal(m.dense_weight().detach(), saved[f"{n}.weight"])
    start = load_ticket(d, 2)  # the weights round 2 trained from: θ0 (imp) or a fresh draw (reinit), masked
    init = torch.load(os.path.join(d, "seed_0", "init.pt"), weights_only=False)
    same_as_init = [torch.equal(m.dense_weight().detach(), init[f"{n}.weight"] * masks[n])
                    for n, m in sparse_layers(start)]
    assert all(same_as_init) if control == "imp" else not any(same_as_init)
    assert sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs) == before  # nothing written
    with pytest.raises(FileNotFoundError, match="round 3 of seed 0 has not finished .*finished: \\[0, 1, 2\\]"):
        load_ticket(d, 3)
    with pytest.raises(FileNotFoundError, match="no replicate of seed 5"):
        load_ticket(d, 1, seed=5)
    with pytest.raises(ValueError, match="weights must be 'start' or 'final'"):
        load_ticket(d, 1, weights="trained")
    with pytest.raises(FileNotFoundError, match="not an experiment folder"):
        load_ticket(tmp_path, 1)


def test_imp_on_a_model_of_ones_own(tmp_path):
    """IMP, a control and a re-run on a model named by import path: its folder name is made safe, its output layer
    is its last Linear (pruned at the output rate), and the control reuses the dense round."""
    hp = tiny_hp(model="user_models:small_cnn", dataset="fashion_mnist", width=1.0, prune_conv=0.1, rounds=1,
                 iterations="4it", eval_every=2)
    res = run(hp, tmp_path)
    assert os.path.basename(res.experiment_dir).startswith("user_models-small_cnn_imp_")
    masks = load_masks(res.experiment_dir, 0, 1)
    assert set(masks) == {"0", "4", "6"}
    left = {n: m.float().mean().item() for n, m in masks.items()}
    assert left["0"] == pytest.approx(0.9, abs=0.03) and left["4"] == pytest.approx(0.8, abs=0.01)
    assert left["6"] == pytest.approx(0.9, abs=0.02)  # the output layer
    assert run(hp, tmp_path).metrics == res.metrics  # found again and skipped
    ctl = run(dataclasses.replace(hp, control="reinit"), tmp_path)
    assert ctl.metrics[0][0]["reused_from"]
    with pytest.raises(ValueError, match="give its dataset"):
        run(dataclasses.replace(hp, dataset=""), tmp_path / "b")
    with pytest.raises(ValueError, match="cannot import"):
        run(dataclasses.replace(hp, model="no_such_module:f"), tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_imp_on_an_all_convolutional_model(tmp_path):
    """A model with no Linear and no output_layer attribute (a 1x1-conv classifier): every layer is pruned at the
    conv rate (it was refused: "no output_layer attribute and no linear layer")."""
    hp = tiny_hp(model="user_models:all_conv", dataset="mnist", width=1.0, prune_conv=0.2, rounds=1,
                 iterations="4it", eval_every=2)
    res = run(hp, tmp_path)
    masks = load_masks(res.experiment_dir, 0, 1)
    assert {n: (int(m.sum()), m.numel()) for n, m in masks.items()} == {"0": (58, 72), "2": (64, 80)}


def test_a_weight_tied_to_another_layers_is_pruned_once(tmp_path):
    """Two layers sharing one weight parameter: one weight, one mask (under the first layer's name), counted once
    in the weights remaining; the second layer computes with the masked weight."""
    import warnings

    from sparse_lth.imp import load_ticket, output_layer_name, prunable_layers
    from user_models import tied_mlp
    m = tied_mlp(10, (1, 28, 28))
    assert [n for n, _ in prunable_layers(m)] == ["inp", "a", "out"] and output_layer_name(m) == "out"
    m.output_layer = "b"  # names the tied layer: the weight's first layer is meant
    assert output_layer_name(m) == "a"
    hp = tiny_hp(model="user_models:tied_mlp", dataset="mnist", width=1.0, rounds=1, iterations="4it",
                 eval_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparsify leaves the tied layers plain, and says so
        res = run(hp, tmp_path)
        ticket = load_ticket(res.experiment_dir, 1)
    masks = load_masks(res.experiment_dir, 0, 1)
    assert set(masks) == {"inp", "a", "out"}
    live = sum(int(v.sum()) for v in masks.values())
    total = sum(v.numel() for v in masks.values())
    assert total == 784 * 16 + 16 * 16 + 16 * 10  # the tied weight once
    assert res.metrics[0][1]["percent_remaining"] == pytest.approx(100 * live / total)
    assert torch.equal(ticket.b.weight != 0, masks["a"]) and ticket.b.weight is ticket.a.weight


def test_imp_keeps_a_reparametrized_layer_dense_and_says_so(tmp_path):
    """A weight_norm layer of a model of one's own: its mask would not hold (the weight is computed at every
    forward), and the rewind point has no '3.weight' (a KeyError in the pruning): it is left out of pruning, with a
    warning naming it, and the other layers are pruned as usual."""
    hp = tiny_hp(model="user_models:weight_normed_mlp", dataset="mnist", width=1.0, rounds=1, iterations="4it",
                 eval_every=2, prune_fc=0.5)
    with pytest.warns(UserWarning, match=r"not pruned \(kept dense\): 3: its weight is parametrized"):
        res = run(hp, tmp_path)
    masks = load_masks(res.experiment_dir, 0, 1)
    assert {n: (int(m.sum()), m.numel()) for n, m in masks.items()} == {"1": (6272, 12544), "5": (144, 160)}  # 5: the output rate


def test_imp_with_a_validation_split(tmp_path):
    """``val_split``: every round trains on the training set less N held-out examples and early-stops where their
    loss is least (the paper's protocol); another experiment folder; a control reuses its dense round; a split
    that leaves nothing to train on is refused before anything is written."""
    from sparse_lth.imp import Experiment
    from sparse_lth.report import load_experiment, selection_markdown, summary_markdown
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1, val_split=40)
    exp = Experiment(hp, str(tmp_path), data=data, progress=False)
    assert len(exp.data[0]) == 200 and len(exp.val_data) == 40 and len(exp.data[1]) == 120
    assert Experiment(tiny_hp(rounds=1), str(tmp_path), data=data).val_data is None
    res = run(hp, tmp_path, data=data)
    plain = run(tiny_hp(rounds=1), tmp_path, data=data)
    assert res.experiment_dir != plain.experiment_dir
    for m in res.metrics[0]:
        assert m["early_stop_on"] == "val" and all("val_loss" in r for r in m["curve"])
        best = min(m["curve"], key=lambda r: (r["val_loss"], r["iteration"]))
        assert (m["early_stop_iteration"], m["early_stop_test_acc"]) == (best["iteration"], best["test_acc"])
    assert all(m["early_stop_on"] == "test" for m in plain.metrics[0])
    # trained on other examples: other weights, other masks
    assert res.metrics[0][0]["test_loss"] != plain.metrics[0][0]["test_loss"]
    ctl = run(dataclasses.replace(hp, control="reinit"), tmp_path, data=data)
    assert ctl.metrics[0][0]["reused_from"] and ctl.metrics[0][1]["early_stop_on"] == "val"
    loaded = load_experiment(res.experiment_dir)
    assert "early stop on the loss of 40 held-out training examples" in summary_markdown([loaded])
    sel = selection_markdown([loaded, load_experiment(plain.experiment_dir)]).splitlines()
    m = res.metrics[0][1]
    at_test = min(m["curve"], key=lambda c: (c["test_loss"], c["iteration"]))["test_acc"]
    row = next(ln for ln in sel if ln.startswith("| 1 |"))
    assert row.count("/") == 2  # the plain experiment has no column: it has no validation split
    assert f"{100 * m['early_stop_test_acc']:.2f} / {100 * at_test:.2f} / " \
           f"{100 * (at_test - m['early_stop_test_acc']):+.2f}" in row
    assert selection_markdown([load_experiment(plain.experiment_dir)]) == ""
    with pytest.raises(ValueError, match="val_split=240: cannot hold out 240 of 240"):
        run(tiny_hp(val_split=240), tmp_path / "b", data=data)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="val_split must be an integer >= 0"):
        run(tiny_hp(val_split=-1), tmp_path / "c", data=data)


def test_a_model_that_does_not_fit_the_data_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="model conv2 does not take .* examples .*3 channels"):
        run(tiny_hp(model="conv2", prune_conv=0.1), tmp_path / "runs")  # MNIST-shaped data: one channel
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kw", [dict(), dict(prune_global=True, prune_fc=0.3), dict(dense_layers=("fc2",))])
def test_the_plan_is_what_the_run_then_does(tmp_path, kw):
    """``Experiment.plan`` (``imp --plan``) gives each round's weights remaining without training or writing, and
    the run then prunes exactly so: overall and per layer kind, layer-wise and global (pooled per kind)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=3, **kw)
    exp = Experiment(hp, str(tmp_path), data=data, progress=False)
    plan = exp.plan()
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert not plan["exists"] and plan["seeds"] == {0: dict(done=0, planned=4, running=None)}
    assert plan["dense_from"] is None and plan["iterations"] == 20 and plan["rewind"] == 0
    assert [ly[1] for ly in plan["layers"]] == ["fc", "fc", "output"] and plan["total"] == sum(plan["kinds"].values())
    res = run(hp, tmp_path, data=data)
    for row, m in zip(plan["rounds"], res.metrics[0], strict=True):
        assert row["live"] == m["remaining_total"] and row["percent"] == pytest.approx(m["percent_remaining"])
        for kind, pct in row["by_kind"].items():
            live = sum(v["live"] for v in m["remaining"].values() if v["kind"] == kind)
            total = sum(v["total"] for v in m["remaining"].values() if v["kind"] == kind)
            assert pct == pytest.approx(100 * live / total)
    again = Experiment(hp, str(tmp_path), data=data, progress=False).plan()
    assert again["exists"] and again["seeds"][0]["done"] == 4


def test_the_plan_of_one_shot_and_of_a_control(tmp_path):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=3)
    imp = Experiment(hp, str(tmp_path), data=data).plan()
    one = Experiment(dataclasses.replace(hp, control="oneshot"), str(tmp_path), data=data).plan()
    assert [r["live"] for r in one["rounds"]] == [imp["rounds"][0]["live"], imp["rounds"][-1]["live"]]
    kept = Experiment(dataclasses.replace(hp, control="oneshot", oneshot_remaining=0.25), str(tmp_path),
                      data=data).plan()
    assert kept["rounds"][1]["by_kind"] == pytest.approx({"fc": 25.0, "output": 25.0}, abs=0.01)
    reinit = Experiment(dataclasses.replace(hp, control="reinit"), str(tmp_path), data=data).plan()
    assert reinit["dense_from"] == os.path.join(str(tmp_path), experiment_name(hp))
    assert "needs the IMP ticket's masks" in reinit["not_ready"]  # the IMP run has not been run
    assert [r["live"] for r in reinit["rounds"]] == [r["live"] for r in imp["rounds"]]


def test_cuda_graph_is_how_an_experiment_runs_not_what_it_is(tmp_path):
    """cuda_graph reaches every round's TrainConfig (and a control's source experiment) but not the experiment's
    hyperparameters: the folder, and so a resume, is the same with or without it."""
    hp = ImpHparams(iterations="100it")
    graphed = Experiment(hp, str(tmp_path), cuda_graph=True)
    plain = Experiment(hp, str(tmp_path))
    assert graphed.dir == plain.dir
    assert graphed.train_cfg.cuda_graph and not plain.train_cfg.cuda_graph
    assert graphed._sibling(hp).train_cfg.cuda_graph


def test_replicate_seeds_finds_negative_seeds_too(tmp_path):
    """`imp --seed -1` trains into seed_-1/: ls, anatomy, export, overlap and train --ticket find replicates through
    replicate_seeds, which skipped it (report, by glob, did not)."""
    from sparse_lth.imp import replicate_seeds
    for d in ("seed_-1", "seed_0", "seed_12", "seed_x", "seed_", "seed_1.5", "notseed_3"):
        (tmp_path / d).mkdir()
    (tmp_path / "seed_7").write_text("a file, not a replicate")
    assert replicate_seeds(tmp_path) == [-1, 0, 12]


def test_files_copied_into_a_run_folder_are_never_left_half_written(tmp_path, monkeypatch):
    """rewind.pt (θ0's copy when rewinding to iteration 0) and a control's copies of its source's round 0 went
    through shutil.copyfile: a kill mid-copy left a truncated rewind.pt, which every later run found, took as
    complete and failed on (PytorchStreamReader...). They go through a temporary and a rename now."""
    import shutil

    from sparse_lth._files import copy_atomic
    src, dst = tmp_path / "init.pt", tmp_path / "rewind.pt"
    src.write_bytes(b"x" * (3 << 20))

    def cut(f_in, f_out, length=0):
        f_out.write(f_in.read(1000))
        raise KeyboardInterrupt  # a kill arriving mid-copy

    monkeypatch.setattr(shutil, "copyfileobj", cut)
    with pytest.raises(KeyboardInterrupt):
        copy_atomic(str(src), str(dst))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.pt"]  # no rewind.pt, no temporary
    monkeypatch.undo()
    copy_atomic(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()


def test_a_replicate_start_removes_only_what_dead_writers_left(tmp_path):
    """At a replicate's start: a temporary whose writer is gone is removed, one whose writer is alive (an analysis
    writing beside the run, without its lock) is kept (it was removed, and the analysis' rename failed), and a
    finished round's checkpoint left by a kill between metrics.json and its removal goes too."""
    from sparse_lth.imp import remove_stale_temporaries
    seed_dir, rdir, running = tmp_path / "seed_0", tmp_path / "seed_0" / "round_01", tmp_path / "seed_0" / "round_02"
    rdir.mkdir(parents=True)
    running.mkdir()
    dead = 2**22 + 12345  # above Linux's pid_max: no process has it
    live = seed_dir / f"anatomy.json.tmp{os.getpid()}"
    for f in (live, seed_dir / f"init.pt.tmp{dead}", rdir / f"final.pt.tmp{dead}", rdir / "checkpoint.pt",
              rdir / "metrics.json", running / "checkpoint.pt"):
        f.write_text("x")
    gone = remove_stale_temporaries(str(seed_dir))
    assert sorted(os.path.relpath(g, seed_dir) for g in gone) == sorted(
        [f"init.pt.tmp{dead}", f"round_01/final.pt.tmp{dead}", "round_01/checkpoint.pt"])
    assert live.exists() and (running / "checkpoint.pt").exists()  # a round still under way keeps its checkpoint


def test_paths_are_timed_in_the_precision_the_round_trains_in(tmp_path, monkeypatch):
    """--precision bf16 with timed paths (what "auto" does on CUDA): the layers are timed under the bf16 autocast
    the round trains under (they were timed in fp32, where the dense path compares otherwise), and each timed step
    includes the step of the optimizer the round trains with (a factory building it)."""
    import sparse_lth.layers as L
    seen, factories = [], []
    real = L.choose_paths

    def spy(model, x, timed=False, optimizer=None):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        factories.append(optimizer)
        return real(model, x, timed=timed, optimizer=optimizer)

    monkeypatch.setattr(L, "choose_paths", spy)
    run(tiny_hp(rounds=1, iterations="4it", eval_every=2, path="auto", timed_paths=True, precision="bf16",
                weight_decay=1e-4), tmp_path)
    assert seen and all(s == (True, torch.bfloat16) for s in seen), seen
    for factory in factories:
        opt = factory([torch.nn.Parameter(torch.zeros(2))])
        assert type(opt) is torch.optim.Adam
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (3e-3, 1e-4)


def test_the_presets_budgets_and_rounds():
    """lenet_quick is 16 rounds of 3,000 iterations (to 2.9 %), as its docstring and README say; it was only tested
    with overrides."""
    from sparse_lth.presets import get_preset
    q = get_preset("lenet_quick")
    assert (q.iterations, q.eval_every, q.rounds) == ("3000it", 250, 16)
    assert get_preset("lenet300_100").rounds == 16 and get_preset("conv2").rounds == 20


def test_a_layerwise_random_prune_control_without_its_ticket_keeps_round_r_counts(tmp_path):
    """a layer-wise random_prune control with no IMP run beside it keeps, in round r, the count r rounds of
    IMP leave in each layer (known without the ticket)."""
    res = run(tiny_hp(rounds=2, control="random_prune"), tmp_path)
    for r in (1, 2):
        masks = load_masks(res.experiment_dir, 0, r)
        rem = res.metrics[0][r]["remaining"]
        for n, mk in masks.items():
            rate = 0.1 if rem[n]["kind"] == "output" else 0.2
            assert int(mk.sum()) == expected_live(mk.numel(), rate, r), (r, n)


def test_the_noise_control_scales_with_the_std_of_theta0_not_of_the_rewind_point(tmp_path):
    """with late rewinding θk differs from θ0: the noise's scale is noise_std x std of the layer's θ0."""
    from sparse_lth.imp import Experiment
    exp = Experiment(tiny_hp(control="noise", noise_std=1.0), str(tmp_path), data=tiny_data(240, 120))
    g = torch.Generator().manual_seed(0)
    init = {"fc.weight": torch.randn(200, 300, generator=g), "fc.bias": torch.zeros(200)}
    start = {"fc.weight": 3.0 * torch.randn(200, 300, generator=g), "fc.bias": torch.zeros(200)}
    torch.save(init, tmp_path / "init.pt")
    torch.save(start, tmp_path / "rewind.pt")
    out = exp._noisy_start(0, 1, str(tmp_path / "init.pt"), str(tmp_path / "rewind.pt"),
                           {"fc": torch.ones(200, 300, dtype=torch.bool)})
    noise = (out["fc.weight"] - start["fc.weight"]).double()
    assert noise.std().item() == pytest.approx(init["fc.weight"].double().std().item(), rel=0.02)
    assert torch.equal(out["fc.bias"], start["fc.bias"])

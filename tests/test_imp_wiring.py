"""The IMP driver's and the pruner's less travelled paths: tie-breaking, what a finished round leaves on disk,
late rewinding's start iterations, the controls' draws round by round, sources and waits, the plan, reading a run
back, step budgets in epochs. Written after a mutation campaign on sparse_lth/imp.py and pruner.py (session 34:
82 mutants, 22 real survivors): each test failed under a mutant the rest of the suite let through."""
import json
import os
import warnings

import pytest
import torch
from conftest import tiny_data

from sparse_lth.imp import ImpHparams, magnitude_prune, prunable_layers, run_imp

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_hp(**kw) -> ImpHparams:
    base = dict(model="lenet300_100", width=0.1, optimizer="adam", lr=3e-3, batch_size=16, iterations="20it",
                eval_every=5, train_eval_size=64, rounds=2, prune_fc=0.2, prune_output=0.1, layer_impl="sparse",
                path="dense")
    base.update(kw)
    return ImpHparams(**base)


def run(hp, root, **kw):
    kw.setdefault("data", tiny_data(240, 120))
    return run_imp(hp, str(root), progress=False, checkpoint_every=kw.pop("checkpoint_every", 5), **kw)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def load_masks(exp_dir, r, seed=0):
    return load(os.path.join(exp_dir, f"seed_{seed}", f"round_{r:02d}", "masks.pt"))["masks"]


class Boom(RuntimeError):
    pass


def crash_in_round_1(hp, root, data, at=13):
    """Run ``hp`` until an exception at iteration ``at`` of round 1 (its checkpoint at 10 is left behind)."""
    def crash(r, it, model):
        if r == 1 and it == at:
            raise Boom()
    with pytest.raises(Boom):
        run(hp, root, data=data, callback=crash)


def grab_starts(store):
    return lambda r, model: store.__setitem__(r, {n: m.dense_weight().detach().clone()
                                                  for n, m in prunable_layers(model)})


# ------------------------------------------------------------------------------------------- pruning arithmetic
def test_ties_in_magnitude_go_to_the_lower_index():
    """magnitude_prune's promise: ties go to the lower index (a stable sort), so the masks are deterministic."""
    w = {"a": torch.ones(10, 20)}  # 200 equal magnitudes: an unstable sort picks them in another order
    m = {"a": torch.ones(10, 20, dtype=torch.bool)}
    out = magnitude_prune(w, m, {"a": 0.3})["a"].reshape(-1)
    assert int((~out).sum()) == 60
    assert not out[:60].any() and out[60:].all()
    # ties among the survivors only: the pruned ones are skipped when counting positions
    m2 = {"a": torch.ones(10, 20, dtype=torch.bool)}
    m2["a"].view(-1)[:100] = False
    out2 = magnitude_prune(w, m2, {"a": 0.5})["a"].reshape(-1)
    assert not out2[:150].any() and out2[150:].all()


# ------------------------------------------------------------------------------------------- the run's rounds
def test_a_finished_round_leaves_no_checkpoint_behind(tmp_path):
    """checkpoint.pt exists only while a round runs: every finished round has masks, final weights and metrics,
    and no checkpoint (a run of many rounds would otherwise keep a full training state per round)."""
    res = run(tiny_hp(rounds=2), tmp_path, checkpoint_every=5)  # checkpoints at 5, 10, 15 in every round
    sdir = os.path.join(res.experiment_dir, "seed_0")
    assert sorted(f for f in os.listdir(sdir) if f.endswith(".pt")) == ["init.pt", "rewind.pt"]
    for r in range(3):
        assert sorted(os.listdir(os.path.join(sdir, f"round_{r:02d}"))) == ["final.pt", "masks.pt", "metrics.json"]


def test_late_rewinding_records_round_0_from_iteration_0_and_later_rounds_from_k(tmp_path):
    res = run(tiny_hp(rounds=2, rewind="6it"), tmp_path)
    assert [m["start_iteration"] for m in res.metrics[0]] == [0, 6, 6]
    assert all(m["rewind_iteration"] == 6 for m in res.metrics[0])
    assert res.metrics[0][0]["curve"][0]["iteration"] == 0


def test_continue_starts_each_round_from_the_previous_rounds_trained_weights(tmp_path):
    """control continue: round r starts from round r-1's final weights (not round 0's), under round r's masks."""
    starts = {}
    res = run(tiny_hp(rounds=2, control="continue"), tmp_path, on_round_start=grab_starts(starts))
    sdir = os.path.join(res.experiment_dir, "seed_0")
    final0, final1 = (load(os.path.join(sdir, f"round_{r:02d}", "final.pt")) for r in (0, 1))
    masks = load_masks(res.experiment_dir, 2)
    for n, w in starts[2].items():
        assert torch.equal(w, final1[f"{n}.weight"] * masks[n])
        assert not torch.equal(w, final0[f"{n}.weight"] * masks[n])


# ------------------------------------------------------------------------------------------- controls
def test_reinit_draws_fresh_weights_every_round(tmp_path):
    data = tiny_data(240, 120)
    run(tiny_hp(rounds=2), tmp_path, data=data)
    starts = {}
    re = run(tiny_hp(rounds=2, control="reinit"), tmp_path, data=data, on_round_start=grab_starts(starts))
    m2 = load_masks(re.experiment_dir, 2)
    for n in m2:  # where a weight lives in both rounds, the two draws differ
        assert not torch.equal(starts[1][n][m2[n]], starts[2][n][m2[n]]), n


def test_random_prune_draws_a_new_random_mask_every_round(tmp_path):
    """random pruning samples each round's mask anew: round 2's is not round 1's with more weights removed (the
    chance that independent uniform masks nest is ~0)."""
    res = run(tiny_hp(rounds=2, control="random_prune"), tmp_path)
    m1, m2 = load_masks(res.experiment_dir, 1), load_masks(res.experiment_dir, 2)
    for n in ("fc1", "fc2"):
        assert (m2[n] & ~m1[n]).any(), n


def test_a_global_random_prune_control_that_waited_in_vain_for_its_ticket_stops(tmp_path):
    """random_prune with global pruning copies the ticket's per-layer counts, which cannot be known without the
    IMP run: when the wait for its masks times out, it must stop, not fall back to layer-wise counts."""
    with pytest.raises(FileNotFoundError, match="masks of round 1"):
        run(tiny_hp(rounds=1, control="random_prune", prune_global=True, prune_fc=0.3), tmp_path,
            wait_for_source=0.2)


def test_oneshot_remaining_leaves_dense_layers_and_zero_rate_layers_dense(tmp_path):
    res = run(tiny_hp(control="oneshot", oneshot_remaining=0.5, rounds=3, dense_layers=("fc2",),
                      prune_output=0.0), tmp_path)
    rem = res.metrics[0][1]["remaining"]
    assert rem["fc2"]["density"] == 1.0 and rem["fc3"]["density"] == 1.0
    assert rem["fc1"]["live"] == rem["fc1"]["total"] // 2


def test_on_round_end_reports_a_reused_dense_round_too(tmp_path):
    """the CLI prints one line per round from on_round_end: a control's round 0 taken from its IMP run is one."""
    data = tiny_data(240, 120)
    run(tiny_hp(rounds=1), tmp_path, data=data)
    ended = []
    run(tiny_hp(rounds=1, control="reinit"), tmp_path, data=data, on_round_end=ended.append)
    assert [m["round"] for m in ended] == [0, 1]
    assert ended[0]["reused_from"] and ended[0]["control"] == "reinit"


def test_a_round_compares_its_numerics_with_the_last_environment_of_the_round_before(tmp_path):
    """round 0 resumed under other numerics records both environments; round 1, running under the last of them,
    does not warn (only a change from the last one is a change)."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    crash_in_round_1(hp, tmp_path, data, at=1)
    from sparse_lth.imp import experiment_name
    mpath = os.path.join(str(tmp_path), experiment_name(hp), "seed_0", "round_00", "metrics.json")
    with open(mpath) as f:
        m = json.load(f)
    first = dict(m["environments"][0], cpu_capability="OTHER")
    m["environments"] = [first, m["environments"][0]]  # began elsewhere, resumed (and ended) here
    with open(mpath, "w") as f:
        json.dump(m, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = run(hp, tmp_path, data=data)
    assert [r["round"] for r in out.metrics[0]] == [0, 1]


def test_hparams_json_holds_the_experiment_not_a_replicate(tmp_path):
    """one hparams.json serves every replicate of the folder: it names no seed (nor how round 0 was obtained)."""
    res = run(tiny_hp(rounds=1, seed=3), tmp_path)
    with open(os.path.join(res.experiment_dir, "hparams.json")) as f:
        saved = json.load(f)
    assert "seed" not in saved and "reuse_dense_round" not in saved
    assert saved["lr"] == 3e-3 and saved["rounds"] == 1 and saved["width"] == 0.1


# ------------------------------------------------------------------------------------------- the plan
def test_the_plan_names_the_round_that_was_running_and_not_a_finished_one(tmp_path):
    """plan()'s ``running``: the round begun and checkpointed (and its iteration); a finished round whose
    checkpoint was left by a kill between its metrics.json and the checkpoint's removal is not running."""
    from sparse_lth.imp import Experiment, experiment_name
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    crash_in_round_1(hp, tmp_path, data)
    plan = Experiment(hp, str(tmp_path), data=data, progress=False).plan()
    assert plan["seeds"][0] == dict(done=1, planned=2, running=(1, 10))
    run(hp, tmp_path, data=data)
    rdir = os.path.join(str(tmp_path), experiment_name(hp), "seed_0", "round_01")
    torch.save({"iteration": 15, "config": {"iterations": 20}}, os.path.join(rdir, "checkpoint.pt"))  # stale
    plan = Experiment(hp, str(tmp_path), data=data, progress=False).plan()
    assert plan["seeds"][0] == dict(done=2, planned=2, running=None)


def test_the_plan_of_a_control_that_trains_its_dense_round_names_no_source_for_it(tmp_path):
    """reuse_dense_round=False: round 0 is trained here, and the plan says so (dense_from None)."""
    from sparse_lth.imp import Experiment
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=2, control="reinit")
    assert Experiment(hp, str(tmp_path), data=data).plan()["dense_from"] is not None
    import dataclasses
    own = Experiment(dataclasses.replace(hp, reuse_dense_round=False), str(tmp_path), data=data).plan()
    assert own["dense_from"] is None


# ------------------------------------------------------------------------------------------- sources
def test_a_global_random_prune_control_without_its_ticket_is_refused_before_training(tmp_path):
    """random_prune with global pruning needs the IMP run's per-layer counts: refused before round 0 trains."""
    from sparse_lth.imp import SourceNotReady
    steps = []
    with pytest.raises(SourceNotReady, match="needs the IMP ticket's masks"):
        run(tiny_hp(rounds=1, control="random_prune", prune_global=True, prune_fc=0.3), tmp_path,
            callback=lambda r, it, m: steps.append(it))
    assert steps == []


def test_a_finished_control_reruns_after_its_imp_run_was_removed(tmp_path):
    """a control that has begun (its round-1 masks are its own) no longer needs the IMP run's files: re-running it
    after that run was deleted finds every round finished instead of refusing."""
    import shutil
    data = tiny_data(240, 120)
    imp = run(tiny_hp(rounds=1), tmp_path, data=data)
    first = run(tiny_hp(rounds=1, control="reinit"), tmp_path, data=data)
    shutil.rmtree(imp.experiment_dir)
    steps = []
    again = run(tiny_hp(rounds=1, control="reinit"), tmp_path, data=data, callback=lambda r, it, m: steps.append(it))
    assert steps == [] and again.metrics == first.metrics


def test_a_temporary_of_another_users_live_process_is_kept(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: that writer is alive, its file stays."""
    import sparse_lth.imp as imp
    seed_dir = tmp_path / "seed_0"
    seed_dir.mkdir()
    other = 4242
    f = seed_dir / f"anatomy.json.tmp{other}"
    f.write_text("x")
    real_kill = os.kill

    def kill(pid, sig):
        if pid == other:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)
    monkeypatch.setattr(imp.os, "kill", kill)
    assert imp.remove_stale_temporaries(str(seed_dir)) == []
    assert f.exists()


# ------------------------------------------------------------------------------------------- reading a run back
def test_load_ticket_defaults_to_the_lowest_seed(tmp_path):
    from sparse_lth.imp import get_masks, load_ticket
    res = run(tiny_hp(rounds=1), tmp_path, replicates=2)
    model = load_ticket(res.experiment_dir, 1)
    want = load_masks(res.experiment_dir, 1, seed=0)
    got = get_masks(model)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not torch.equal(got["fc1"], load_masks(res.experiment_dir, 1, seed=1)["fc1"])


# ------------------------------------------------------------------------------------------- step counts
def test_a_budget_in_epochs_rounds_to_the_nearest_iteration_and_counts_a_partial_batch():
    """"Nep" = N x ceil(n_train / batch) iterations (an epoch's last partial batch is one iteration; the docs'
    VGG epoch = ceil(50000 / 64) = 782), rounded to the nearest iteration (0.29 x 100 is 28.999... in floats)."""
    from sparse_lth.imp import Experiment, parse_steps
    assert parse_steps("0.29ep", 100, "iterations") == 29
    assert parse_steps("2.6ep", 10, "iterations") == 26
    exp = Experiment(tiny_hp(iterations="2ep", rewind="1ep"), "unused", data=tiny_data(250, 60), progress=False)
    assert exp.iterations == 32 and exp.rewind_iteration == 16  # 250 / 16 = 15.6: 16 iterations an epoch


def test_negative_rounds_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        run(tiny_hp(rounds=-1), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_ticket_refuses_a_round_that_has_begun_but_not_finished(tmp_path):
    from sparse_lth.imp import load_ticket
    data = tiny_data(240, 120)
    crash_in_round_1(tiny_hp(rounds=1), tmp_path, data)
    from sparse_lth.imp import experiment_name
    exp = os.path.join(str(tmp_path), experiment_name(tiny_hp(rounds=1)))
    load_ticket(exp, 0)
    with pytest.raises(FileNotFoundError, match="round 1 of seed 0 has not finished"):
        load_ticket(exp, 1)


def test_an_infinite_noise_level_is_refused(tmp_path):
    with pytest.raises(ValueError, match="noise_std > 0"):
        run(tiny_hp(control="noise", noise_std=float("inf")), tmp_path)
    assert list(tmp_path.iterdir()) == []

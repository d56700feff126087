"""The `sparse-lth` command's wiring: parsing limits, each flag reaching what it sets, defaults, plans and
messages. Written after a mutation campaign on sparse_lth/cli.py (session 34): each test here failed under a
mutant that every other test let through (a flag parsed and then dropped, a default changed, a bound off by one)."""
import json
import os
import shutil

import pytest
import torch

from conftest import require_shared_data
from sparse_lth.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


def mnist_root() -> str:
    return str(require_shared_data())


def tiny_imp_args(root, *extra):
    return ["imp", "--preset", "lenet_quick", "--data", mnist_root(), "--runs", str(root), "--iterations", "30it",
            "--eval-every", "10", "--rounds", "2", "--width", "0.1", "--data-limit", "300", "--test-limit", "200",
            "--batch-size", "20", "--checkpoint-every", "10", "--no-progress", *extra]


BASE = ["train", "--data-limit", "300", "--test-limit", "200", "--no-progress"]
TRAIN = BASE + ["--iterations", "20", "--eval-every", "10"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny finished IMP run (rounds 0..2, seed 0), shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("runs")
    assert main(tiny_imp_args(root, "--no-report")) == 0
    return next(p for p in root.iterdir() if p.name.startswith("lenet300_100_imp_"))


def parse(*argv):
    return build_parser()[0].parse_args(list(argv))


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- parsing limits
def test_an_empty_list_flag_is_no_items():
    """--milestones "" clears a preset's milestones (an empty list), it is not an "empty item" error."""
    assert parse("imp", "--milestones", "").milestones == ()
    assert parse("imp", "--dense-layers", " ").dense_layers == ()


def test_lower_bounds_are_inclusive():
    """The documented minimums are accepted: --replicates 1, --checkpoint-every 0 (never), --points 2."""
    assert parse("imp", "--replicates", "1").replicates == 1
    assert parse("imp", "--checkpoint-every", "0").checkpoint_every == 0
    assert parse("stability", "x", "--points", "2").points == 2
    assert parse("landscape", "x", "--tol", "0").tol == 0.0


def test_threads_up_to_four_times_the_cores(capsys):
    most = 4 * (os.cpu_count() or 1)
    assert parse("env", "--threads", str(most)).threads == most
    assert f"--threads: must be <= {most}, got {most + 1}" in refused(capsys, "env", "--threads", str(most + 1))


def test_density_one_is_allowed_and_zero_is_refused(capsys):
    assert parse("train", "--density", "1").density == 1.0
    assert parse("train", "--density", "1e-3").density == 1e-3
    assert "--density: the fraction of weights kept must lie in (0, 1], got 0" in \
        refused(capsys, "train", "--density", "0")


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch, capsys):
    """--device cuda:N with N >= the GPUs torch sees: a clear error naming how many there are (cuda:1 of 1 GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["env", "--device", "cuda:1"]) == 2
    assert "--device cuda:1: torch sees 1 CUDA GPU(s) here" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- imp --plan
def plan(capsys, *argv) -> list[str]:
    assert main(list(argv) + ["--plan"]) == 0
    return capsys.readouterr().out.splitlines()


def test_a_flag_set_to_false_or_zero_overrides_the_preset(tmp_path, capsys):
    """resnet20's preset prunes globally: --no-prune-global makes it layer-wise (a False flag was not "not given")."""
    out = plan(capsys, "imp", "--preset", "resnet20", "--runs", str(tmp_path), "--no-prune-global")
    assert "(layer-wise); control imp" in out[3]
    out = plan(capsys, "imp", "--preset", "resnet20", "--runs", str(tmp_path))
    assert "(global); control imp" in out[3]
    # the layer counts, singular and plural
    assert "conv 270,256 (21 layers), output 640 (1 layer)" in out[2]
    assert "pruning per round: conv 0.2, output 0 of the survivors" in out[3]
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_plan_of_replicates_from_another_seed_into_a_run_dir(tmp_path, capsys):
    """--seed S --replicates 2 plans seeds S and S+1; --run-dir is the folder planned."""
    out = plan(capsys, "imp", "--preset", "lenet_quick", "--runs", str(tmp_path), "--seed", "3", "--replicates", "2",
               "--run-dir", str(tmp_path / "here"))
    assert out[0] == f"experiment folder: {tmp_path / 'here'} (new)"
    assert out[1].startswith("  seed 3: 0 of ") and out[2].startswith("  seed 4: 0 of ")
    assert "pruning per round: fc 0.2, output 0.1 of the survivors" in out[4]
    assert not (tmp_path / "here").exists()


def test_plan_names_dense_layers_and_the_wait_for_a_source(finished_run, tmp_path, capsys):
    out = "\n".join(plan(capsys, *tiny_imp_args(tmp_path), "--prune-fc", "0.5", "--dense-layers", "fc3",
                         "--source", str(finished_run), "--wait-for-source", "5"))
    assert "; kept dense: fc3; control imp" in out
    assert f"round 0 (the dense network): taken from {finished_run} where it has finished there " \
           "(waiting up to 5 s for it)" in out
    out = "\n".join(plan(capsys, *tiny_imp_args(tmp_path), "--prune-fc", "0.5", "--source", str(finished_run)))
    assert f"taken from {finished_run} where it has finished there, else trained here" in out


def test_sparse_layer_flags_with_masked_layers_are_named_in_the_note(tmp_path, capsys):
    out = plan(capsys, "imp", "--preset", "lenet_quick", "--runs", str(tmp_path), "--layer-impl", "masked",
               "--backend", "torch", "--ops", "dense")
    assert out[0].startswith("note: --ops, --backend set how sparse layers run; --layer-impl masked")


# -------------------------------------------------------------------------------------------------------- train
def train_json(tmp_path, *argv, name="m.json", base=TRAIN) -> dict:
    out = tmp_path / name
    assert main([*base, "--data", mnist_root(), *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_train_defaults_are_the_lenet_paper_settings(tmp_path, capsys):
    """Without flags: Adam at lr 1.2e-3, batch 60, an evaluation every 100 iterations, model seed 0, magnitude
    masks, sparse layers: the same run as with all of them given; --no-progress draws no bar."""
    common = ["--iterations", "100", "--density", "0.5", "--eval-every"]
    default = train_json(tmp_path, "--iterations", "100", "--density", "0.5", name="d.json", base=BASE)
    assert [c["iteration"] for c in default["curve"]] == [0, 100]
    given = train_json(tmp_path, *common, "100", "--optimizer", "adam", "--lr", "0.0012", "--batch-size", "60",
                       "--model-seed", "0", "--mask", "magnitude", "--layers", "sparse", name="g.json", base=BASE)
    assert given["curve"] == default["curve"]
    assert "it/s" not in capsys.readouterr().err  # no progress bar
    # and each of them matters (so the comparison above can fail)
    for flag, value in (("--lr", "0.002"), ("--batch-size", "40"), ("--model-seed", "1"), ("--mask", "random")):
        other = train_json(tmp_path, *common, "100", flag, value, name="o.json", base=BASE)
        assert other["curve"] != default["curve"], flag


def test_train_test_limit_and_dataset_are_used(tmp_path):
    m = train_json(tmp_path, "--test-limit", "7")
    assert all(abs(c["test_acc"] * 7 - round(c["test_acc"] * 7)) < 1e-6 for c in m["curve"])
    fashion = train_json(tmp_path, "--dataset", "fashion_mnist", name="f.json")
    mnist = train_json(tmp_path, "--dataset", "mnist", name="n.json")
    assert fashion["curve"][0]["test_loss"] != mnist["curve"][0]["test_loss"]


def test_train_dense_layers(tmp_path):
    """--layers dense trains the plain network (every weight): 100% remaining, no sparse paths."""
    m = train_json(tmp_path, "--layers", "dense")
    assert m["percent_remaining"] == 100.0 and m["paths"] == {}


def test_train_masked_layers_are_masked(tmp_path):
    """--layers masked --density 0.05 trains 5% of the weights, as the sparse layers' dense path does."""
    masked = train_json(tmp_path, "--layers", "masked", "--density", "0.05", name="a.json")
    sparse = train_json(tmp_path, "--layers", "sparse", "--path", "dense", "--density", "0.05", name="b.json")
    dense = train_json(tmp_path, "--layers", "dense", name="c.json")
    assert masked["percent_remaining"] == pytest.approx(5.0, abs=0.01)
    assert masked["curve"][0]["test_loss"] == pytest.approx(sparse["curve"][0]["test_loss"], rel=1e-5)
    assert masked["curve"][0]["test_loss"] != pytest.approx(dense["curve"][0]["test_loss"], rel=1e-3)


def test_train_refuses_sparse_flags_and_ticket_flags_out_of_place(capsys):
    for argv, msg in ((["--layers", "masked", "--timed-paths"], "--timed-paths choose how sparse layers run"),
                      (["--ticket-seed", "1"], "--round, --ticket-seed and --ticket-weights go with --ticket"),
                      (["--ticket-weights", "final"], "go with --ticket"),
                      (["--path", "sparse", "--density", "0.05", "--backend", "bogus"], "unknown backend 'bogus'")):
        assert main([*TRAIN, "--data", mnist_root(), *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_train_times_paths_with_its_own_optimizer(tmp_path, monkeypatch):
    """train --timed-paths: each timed step includes the step of the optimizer the command trains with (a factory
    building it from its flags), so a small layer's sparse path is not undervalued."""
    import sparse_lth.layers as L
    factories = []
    real = L.choose_paths

    def spy(model, x, timed=False, optimizer=None):
        factories.append(optimizer)
        return real(model, x, timed=timed, optimizer=optimizer)

    monkeypatch.setattr(L, "choose_paths", spy)
    train_json(tmp_path, "--timed-paths", "--density", "0.05", "--optimizer", "sgd", "--lr", "0.07",
               "--iterations", "2")
    assert len(factories) == 1
    opt = factories[0]([torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.07


def test_threads_flag_sets_torch_threads(tmp_path, capsys):
    """--threads N is torch.set_num_threads(N), for imp (also with --plan) and env (one_thread restores it)."""
    plan(capsys, "imp", "--preset", "lenet_quick", "--runs", str(tmp_path), "--threads", "2")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert main(["env", "--device", "cpu", "--threads", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu"]["threads"] == 2 and torch.get_num_threads() == 2


def test_env_says_when_triton_is_interpreted(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["env", "--device", "cpu"]) == 0
    assert "(TRITON_INTERPRET=1: its interpreter runs the kernels)" in capsys.readouterr().out
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["env", "--device", "cpu"]) == 0
    assert "TRITON_INTERPRET=1" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- export
def test_export_defaults_to_the_start_weights(finished_run, tmp_path, monkeypatch, capsys):
    """export without --weights: the ticket (the weights round 1 started from: theta0 with rewinding to 0), in
    ./ticket_<experiment>_round01_start.pt, and the share of weights left said in percent."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(finished_run), "--round", "1"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / f"ticket_{finished_run.name}_round01_start.pt"
    state = torch.load(path, weights_only=False)
    init = torch.load(finished_run / "seed_0" / "init.pt", weights_only=False)
    init = init.get("state_dict", init) if isinstance(init, dict) else init
    mask = state["fc1.weight_mask"].bool()
    assert torch.equal(state["fc1.weight"], torch.where(mask, init["fc1.weight"], torch.zeros(())))
    live = sum(int(v.sum()) for k, v in state.items() if k.endswith("weight_mask"))
    total = sum(v.numel() for k, v in state.items() if k.endswith("weight_mask"))
    assert f"start weights, {100.0 * live / total:.2f}% of {total:,} weights remaining" in out
    assert 70 < 100.0 * live / total < 90


def test_export_refuses_a_missing_seed_and_an_unwritable_out(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run), "--round", "1", "--seed", "5", "--out", str(tmp_path / "t.pt")]) == 2
    assert "has no replicate of seed 5" in capsys.readouterr().err
    assert main(["export", str(finished_run), "--round", "1", "--out", str(tmp_path / "no" / "t.pt")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- report, ls
def test_report_seeds_selects_replicates(finished_run, tmp_path, capsys):
    assert main(["report", str(finished_run), "--seeds", "5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no finished rounds to report" in err and "for seeds 5" in err
    assert main(["report", str(finished_run), "--seeds", "0", "--out", str(tmp_path / "r")]) == 0
    assert "% remaining" in (tmp_path / "r" / "summary.md").read_text()


def test_ls_defaults_to_runs_here(tmp_path, monkeypatch, capsys):
    """ls without a PATH lists ./runs (not every experiment below the current folder)."""
    for where in ("runs/a_exp", "elsewhere/b_exp"):
        os.makedirs(tmp_path / where)
        with open(tmp_path / where / "hparams.json", "w") as f:
            json.dump(dict(model="lenet300_100", rounds=2), f)
    monkeypatch.chdir(tmp_path)
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "a_exp" in out and "b_exp" not in out
    assert main(["ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["a_exp"] and "hparams" not in rows[0]


# ------------------------------------------------------------------------------------------------------ imp run
def test_imp_replicates_run_dir_no_report_and_the_table(tmp_path, capsys):
    """--replicates 2 trains seeds 0 and 1, into --run-dir; --no-report writes no report (and says none); the
    table's accuracy columns are each round's accuracy at early stop, then at the end, in percent."""
    run_dir = tmp_path / "mine"
    assert main(tiny_imp_args(tmp_path / "runs", "--rounds", "1", "--replicates", "2", "--run-dir", str(run_dir),
                              "--no-report", "--iterations", "80it", "--data-limit", "40", "--lr", "0.02")) == 0
    cap = capsys.readouterr()
    assert (run_dir / "seed_0" / "round_01" / "metrics.json").exists()
    assert (run_dir / "seed_1" / "round_01" / "metrics.json").exists()
    assert not (run_dir / "report").exists() and "report:" not in cap.out
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    assert "it/s" not in cap.err  # --no-progress
    table = cap.out.split("experiment:")[1].splitlines()[2:]
    rows = {(int(r.split()[0]), int(r.split()[1])): r.split() for r in table if r.split()[:1] in (["0"], ["1"])}
    for (s, r), row in rows.items():
        m = json.loads((run_dir / f"seed_{s}" / f"round_{r:02d}" / "metrics.json").read_text())
        assert row[4] == f"{100 * m['early_stop_test_acc']:.2f}" and row[5] == f"{100 * m['test_acc']:.2f}"
    assert len(rows) == 4 and any(row[4] != row[5] for row in rows.values())


def test_imp_passes_its_run_settings_on(tmp_path, monkeypatch, capsys):
    """--checkpoint-every, --source and --wait-for-source reach the IMP driver (the default: every 1000
    iterations, no source, no wait)."""
    import sparse_lth.imp as imp
    seen = []

    def spy(hp, runs, **kw):
        seen.append(kw)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(imp, "run_imp", spy)
    assert main(tiny_imp_args(tmp_path, "--checkpoint-every", "7", "--source", str(tmp_path / "src"),
                              "--wait-for-source", "3")) == 130
    assert seen[-1]["checkpoint_every"] == 7 and seen[-1]["source_dir"] == str(tmp_path / "src")
    assert seen[-1]["wait_for_source"] == 3.0 and seen[-1]["progress"] is False
    argv = tiny_imp_args(tmp_path)
    i = argv.index("--checkpoint-every")
    del argv[i:i + 2]
    assert main(argv) == 130
    assert seen[-1]["checkpoint_every"] == 1000 and seen[-1]["source_dir"] is None
    assert seen[-1]["wait_for_source"] == 0.0
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------- train --ticket
SAME = ["--data", None, "--iterations", "30", "--eval-every", "10", "--batch-size", "20", "--data-limit", "300",
        "--test-limit", "200", "--no-progress"]


def same():
    return [mnist_root() if a is None else a for a in SAME]


def test_train_a_ticket_s_final_weights_and_another_replicate(finished_run, tmp_path, capsys):
    """--ticket-weights final starts from the weights round 2 ended with (its last evaluation, again);
    --ticket-seed 1 trains replicate 1's ticket and says so; --layers dense is refused with a ticket."""
    rec = json.loads((finished_run / "seed_0" / "round_02" / "metrics.json").read_text())
    out = tmp_path / "t.json"
    assert main(["train", "--ticket", str(finished_run), "--round", "2", "--ticket-weights", "final", *same(),
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["curve"][0]["test_loss"] == rec["curve"][-1]["test_loss"] and m["ticket"]["weights"] == "final"
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    shutil.copytree(exp / "seed_0", exp / "seed_1")
    assert main(["train", "--ticket", str(exp), "--round", "2", "--ticket-seed", "1", *same(),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ticket"]["seed"] == 1
    capsys.readouterr()
    assert main(["train", "--ticket", str(exp), "--round", "2", "--layers", "dense", *same()]) == 2
    assert "--ticket brings its masks" in capsys.readouterr().err


def test_train_fresh_weights_with_the_run_s_seed_when_it_rewinds_late(tmp_path, capsys):
    """With late rewinding the run's own seed draws theta0, not the ticket's weights (the rewind point): it is a
    fresh initialization like any other, and accepted."""
    assert main(tiny_imp_args(tmp_path, "--no-report", "--rounds", "1", "--rewind", "10it")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    out = tmp_path / "t.json"
    assert main(["train", "--ticket", str(exp), "--round", "1", "--ticket-weights", "fresh", "--model-seed", "0",
                 *same(), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ticket"]["model_seed"] == 0


# --------------------------------------------------------------------------------------------------------- main
def test_an_interrupted_stability_analysis_says_how_to_resume(monkeypatch, capsys):
    import sparse_lth.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_stability", interrupted)
    assert main(["stability", "x"]) == 130
    assert capsys.readouterr().err.strip() == ("sparse-lth stability: interrupted; run the same command again to "
                                               "resume (finished copies are kept)")
    monkeypatch.setattr(cli, "_cmd_landscape", interrupted)
    assert main(["landscape", "x"]) == 130
    assert capsys.readouterr().err.strip() == "sparse-lth landscape: interrupted"


def test_an_empty_sparse_lth_debug_is_off(monkeypatch, capsys):
    monkeypatch.setenv("SPARSE_LTH_DEBUG", "")
    assert main(["export", "no_such_run", "--round", "0"]) == 2
    assert capsys.readouterr().err.startswith("sparse-lth export: error: ")


# ----------------------------------------------------------------------------------------------------- analyses
def test_analyses_pass_their_settings_on(finished_run, monkeypatch, capsys):
    """stability --checkpoint-every and --no-progress reach the experiment the copies train in."""
    import sparse_lth.imp as imp
    seen = []

    def spy(exp_dir, seed, **kw):
        seen.append(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(imp, "open_experiment", spy)
    assert main(["stability", str(finished_run), "--checkpoint-every", "7", "--no-progress"]) == 130
    assert seen[-1]["checkpoint_every"] == 7 and seen[-1]["progress"] is False
    assert main(["stability", str(finished_run)]) == 130
    assert seen[-1]["checkpoint_every"] == 1000 and seen[-1]["progress"] is True
    capsys.readouterr()


def test_analyses_refuse_a_bad_device_before_any_work(finished_run, capsys):
    for argv in (["stability", str(finished_run), "--rounds", "0"], ["landscape", str(finished_run)],
                 ["anatomy", str(finished_run), "--evaluate"]):
        assert main(argv + ["--device", "foo", "--data", "/nonexistent"]) == 2, argv
        assert "--device foo" in capsys.readouterr().err, argv
    assert not (finished_run / "stability").exists() and not (finished_run / "anatomy").exists()


def test_landscape_records_its_settings_and_keeps_to_the_seeds(finished_run, tmp_path, capsys):
    """--examples and --tol reach the analysis (recorded in landscape.json); --seeds 0 of a run whose replicate 1
    was analysed too reports seed 0 only."""
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    shutil.copytree(exp / "seed_0", exp / "seed_1")
    args = ["landscape", str(exp), "--data", mnist_root(), "--rounds", "2", "--top", "1", "--iters", "5",
            "--no-progress", "--out", str(tmp_path / "l")]
    assert main(args + ["--examples", "50", "--tol", "0.01"]) == 0
    d = json.loads((exp / "seed_1" / "round_02" / "landscape.json").read_text())
    assert d["examples"] == 50 and d["tol"] == 0.01
    capsys.readouterr()
    assert main(args + ["--examples", "50", "--tol", "0.01", "--seeds", "0"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| imp |")]
    assert rows and all(ln.split("|")[3].strip() == "0" for ln in rows)


def test_overlap_rounds_match_and_seed_pairs(finished_run, tmp_path, capsys):
    """--rounds picks A's rounds; --seeds S --seed-b T compares replicate S with T; experiments with no replicate
    in common are refused clearly."""
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    shutil.copytree(exp / "seed_0", exp / "seed_1")
    assert main(["overlap", str(exp), str(exp), "--seeds", "1", "--seed-b", "0", "--rounds", "1",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "(seed 1) against" in out and "seed 1 vs 0" in out
    table = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| ") and "round" not in ln]
    assert "1" in table and "2" not in table
    other = tmp_path / "other"
    shutil.copytree(exp, other)
    shutil.rmtree(other / "seed_0")
    shutil.rmtree(exp / "seed_1")
    assert main(["overlap", str(exp), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "have no replicate (seed) in common with a finished round" in capsys.readouterr().err


def test_anatomy_rounds_pick_the_histograms(finished_run, tmp_path, capsys):
    """anatomy --rounds 1: the starting-weight statistics of round 1 only (default: 0, the middle, the last)."""
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    assert main(["anatomy", str(exp), "--rounds", "1", "--out", str(tmp_path / "a")]) == 0
    assert list(json.loads((exp / "seed_0" / "anatomy.json").read_text())["init_weights"]) == ["1"]
    assert main(["anatomy", str(exp), "--out", str(tmp_path / "a")]) == 0
    assert list(json.loads((exp / "seed_0" / "anatomy.json").read_text())["init_weights"]) == ["0", "1", "2"]
    capsys.readouterr()


def test_report_title(finished_run, tmp_path, capsys):
    """report --title names the report (the analyses' tables drawn again in it carry it; default: the model)."""
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    assert main(["anatomy", str(exp)]) == 0
    assert main(["report", str(exp), "--title", "My tickets", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "anatomy.md").read_text().splitlines()[0].endswith(": My tickets")
    assert main(["report", str(exp), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "anatomy.md").read_text().splitlines()[0].endswith(": lenet300_100")
    capsys.readouterr()


def test_stability_bn_reset_reaches_the_analysis(finished_run, tmp_path, capsys):
    exp = tmp_path / finished_run.name
    shutil.copytree(finished_run, exp)
    assert main(["stability", str(exp), "--data", mnist_root(), "--rounds", "1", "--points", "2", "--bn-reset", "1",
                 "--no-progress"]) == 0
    d = json.loads((exp / "seed_0" / "round_01" / "stability" / "stability.json").read_text())
    assert d["bn_reset_batches"] == 1 and d["points"] == 2
    capsys.readouterr()


def test_overlap_match_by_round_or_by_weights_remaining(finished_run, tmp_path, capsys):
    """B without a round 0: by round (the default) A's round 0 has no finished round in B; with --match remaining
    it has none as sparse (the other pairing, named in the refusal)."""
    b = tmp_path / "b"
    shutil.copytree(finished_run, b)
    shutil.rmtree(b / "seed_0" / "round_00")
    argv = ["overlap", str(finished_run), str(b), "--rounds", "0", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "rounds [0] of A have no finished round in B" in capsys.readouterr().err
    assert main(argv + ["--match", "remaining"]) == 2
    assert "rounds [0] of A have no round as sparse in B" in capsys.readouterr().err


def test_imp_runs_under_runs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = plan(capsys, "imp", "--preset", "lenet_quick")
    folder = out[0].split(": ", 1)[1].rsplit(" (", 1)[0]
    assert os.path.dirname(os.path.abspath(folder)) == str(tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []


def test_analysis_defaults_are_those_the_help_gives(capsys):
    """stability --points (default 11) and landscape --top (default 3), --examples (1000), --iters (60)."""
    with pytest.raises(SystemExit):
        main(["stability", "--help"])
    assert "(default 11)" in " ".join(capsys.readouterr().out.split()) and parse("stability", "x").points == 11
    with pytest.raises(SystemExit):
        main(["landscape", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 3)" in text and "(default 1000)" in text and "(default 60)" in text
    args = parse("landscape", "x")
    assert (args.top, args.examples, args.iters, args.tol) == (3, 1000, 60, 1e-3)


def test_plan_says_how_a_oneshot_control_prunes_and_the_training_numerics(tmp_path, capsys):
    """--plan of a oneshot control says it prunes the dense network at once (to the sparsity `rounds` IMP rounds
    reach, to each round's with --oneshot-levels, or to --oneshot-remaining), not "per round ... of the survivors"
    as IMP; and the round's line names bf16 autocast and the sparse_lth optimizer when they are asked for."""
    base = ["imp", "--preset", "lenet_quick", "--runs", str(tmp_path), "--rounds", "3"]
    out = plan(capsys, *base, "--control", "oneshot")
    assert out[3].startswith("pruning: once, the dense network straight to the sparsity 3 IMP rounds of fc 0.2, "
                             "output 0.1 of the survivors reach (layer-wise)")
    out = plan(capsys, *base, "--control", "oneshot", "--oneshot-levels")
    assert out[3].startswith("pruning: round r prunes the dense network at once to the sparsity r IMP rounds of ")
    out = plan(capsys, *base, "--control", "oneshot", "--oneshot-remaining", "0.05")
    assert out[3].startswith("pruning: once, the dense network straight to 0.05 of each pruned pool (layer-wise)")
    out = plan(capsys, *base)
    assert out[3].startswith("pruning per round: fc 0.2") and out[4].startswith("each round: adam lr 0.0012, batch "
                                                                                  "60, 3,000 iterations")
    out = plan(capsys, *base, "--precision", "bf16", "--optimizer-impl", "sparse_lth")
    assert out[4].startswith("each round: adam lr 0.0012, batch 60, bf16 autocast, sparse_lth optimizer, 3,000 ")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []

"""CLI smoke tests: --help, `imp` (+ a control, resume/skip, the report), `report`, `train`, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import require_shared_data
from sparse_lth.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mnist_root() -> str:
    return str(require_shared_data())  # the tests fail, never skip, when the data is missing


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_imp_args(root, *extra):
    return ["imp", "--preset", "lenet_quick", "--data", mnist_root(), "--runs", str(root), "--iterations", "30it",
            "--eval-every", "10", "--rounds", "2", "--width", "0.1", "--data-limit", "300", "--test-limit", "200",
            "--batch-size", "20", "--checkpoint-every", "10", "--no-progress", *extra]


def test_help(capsys):
    for argv in (["--help"], ["imp", "--help"], ["train", "--help"], ["report", "--help"], ["stability", "--help"],
                 ["landscape", "--help"], ["anatomy", "--help"], ["env", "--help"], ["export", "--help"],
                 ["overlap", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--prune-fc", "--rewind", "--control", "--replicates", "--milestones", "--density",
                 "--noise-seeds", "--bn-reset", "--top"):
        assert flag in out
    r = subprocess.run([sys.executable, "-m", "sparse_lth.cli", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "imp" in r.stdout and "report" in r.stdout


def test_imp_control_and_report(tmp_path, capsys):
    assert main(tiny_imp_args(tmp_path)) == 0
    out = capsys.readouterr().out
    exps = [d for d in os.listdir(tmp_path) if d.startswith("lenet300_100_imp_")]
    assert len(exps) == 1 and "experiment:" in out
    # one line per round as it finishes (before the closing table), even without a progress bar
    live = out.split("experiment:")[0].splitlines()
    # first, where it runs (what each round records)
    assert live[0].startswith("running on: cpu: ") and "torch " in live[0] and "thread" in live[0]
    # then the folder, before anything trains (to point a control at it, or `sparse-lth ls`)
    assert live[1] == f"experiment folder: {tmp_path / exps[0]}"
    assert live[2].split()[:2] == ["seed", "round"]
    assert [ln.split()[:2] for ln in live[3:]] == [["0", "0"], ["0", "1"], ["0", "2"]]
    exp = tmp_path / exps[0]
    for r in range(3):
        assert (exp / "seed_0" / f"round_{r:02d}" / "metrics.json").exists()
    with open(exp / "hparams.json") as f:
        hp = json.load(f)
    assert hp["iterations"] == "30it" and hp["width"] == 0.1 and hp["rounds"] == 2
    for name in ("accuracy_vs_remaining.png", "early_stop_vs_remaining.png", "curves.png", "summary.md"):
        assert (exp / "report" / name).stat().st_size > 0
    # the reinit control finds the ticket's masks; its report shows both
    assert main(tiny_imp_args(tmp_path, "--control", "reinit")) == 0
    capsys.readouterr()
    rexp = [d for d in os.listdir(tmp_path) if d.startswith("lenet300_100_reinit_")][0]
    summary = (tmp_path / rexp / "report" / "summary.md").read_text()
    assert "random reinit" in summary and "IMP (winning ticket)" in summary and "Comparison by round" in summary
    # re-running the finished experiment trains nothing and prints the same table
    assert main(tiny_imp_args(tmp_path, "--no-report")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("experiment folder:")
    assert out.splitlines()[2].startswith("experiment:")  # nothing trained, so no per-round lines
    assert len([ln for ln in out.splitlines() if ln.split()[:1] == ["0"]]) == 3
    # report over the run root
    out_dir = tmp_path / "rep"
    assert main(["report", str(tmp_path), "--out", str(out_dir)]) == 0
    assert (out_dir / "accuracy_vs_remaining.png").exists() and (out_dir / "summary.md").exists()


def test_imp_bad_hparams_exit_2(tmp_path, capsys):
    assert main(tiny_imp_args(tmp_path, "--prune-fc", "1.5")) == 2
    assert "prune_fc" in capsys.readouterr().err
    assert main(tiny_imp_args(tmp_path, "--rewind", "40it")) == 2
    assert "rewind point" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["imp", "--preset", "nope"])
    with pytest.raises(SystemExit):
        main(["imp", "--control", "magic"])
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_train_command(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["train", "--data", mnist_root(), "--density", "0.2", "--path", "sparse", "--iterations", "20",
                 "--eval-every", "10", "--data-limit", "300", "--test-limit", "200", "--no-progress",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert set(m["paths"].values()) == {"sparse"} and abs(m["percent_remaining"] - 20.0) < 0.01
    assert [c["iteration"] for c in m["curve"]] == [0, 10, 20] and 0 <= m["test_acc"] <= 1
    assert m["early_stop_on"] == "test" and "val_loss" not in m["curve"][0]
    assert main(["train", "--data", mnist_root(), "--iterations", "20", "--eval-every", "10", "--data-limit", "300",
                 "--test-limit", "200", "--val-split", "100", "--no-progress", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["early_stop_on"] == "val" and all("val_acc" in c for c in m["curve"])
    best = min(m["curve"], key=lambda c: (c["val_loss"], c["iteration"]))
    assert m["early_stop_iteration"] == best["iteration"] and m["early_stop_test_acc"] == best["test_acc"]
    capsys.readouterr()
    assert main(["train", "--data", mnist_root(), "--data-limit", "300", "--val-split", "300", "--no-progress"]) == 2
    assert "--val-split 300: cannot hold out 300 of 300 examples" in capsys.readouterr().err
    # a density that keeps no weight of a layer (LeNet's output layer has 1,000) trained it all pruned
    assert main(["train", "--data", mnist_root(), "--data-limit", "300", "--density", "0.0004", "--iterations", "5",
                 "--eval-every", "5", "--no-progress"]) == 2
    assert "--density 0.0004 keeps no weight of fc3" in capsys.readouterr().err


def test_train_a_ticket_of_a_run(tmp_path, capsys):
    """train --ticket RUN --round R: the round's masks and starting weights, trained with the run's own settings
    (the default: no training flag given), give the run's round again to the last digit, and a flag overrides one
    of them; --ticket-weights fresh trains the masks from another initialization; --dataset fashion_mnist
    transfers the MNIST ticket; misuse is refused clearly."""
    assert main(tiny_imp_args(tmp_path, "--no-report")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    rec = json.loads((exp / "seed_0" / "round_02" / "metrics.json").read_text())
    out = tmp_path / "t.json"
    assert main(["train", "--ticket", str(exp), "--round", "2", "--data", mnist_root(), "--no-progress",
                 "--out", str(out)]) == 0  # every setting the run's: 30 iterations of 20 of its 300 examples, ...
    m = json.loads(out.read_text())
    assert m["curve"] == rec["curve"] and m["percent_remaining"] == pytest.approx(rec["percent_remaining"])
    assert main(["train", "--ticket", str(exp), "--round", "2", "--data", mnist_root(), "--no-progress",
                 "--lr", "0.01", "--out", str(out)]) == 0  # one setting overridden, the rest the run's
    other = json.loads(out.read_text())
    assert [c["iteration"] for c in other["curve"]] == [c["iteration"] for c in rec["curve"]]
    assert other["curve"][0]["lr"] == 0.01 and other["curve"][0]["test_loss"] == rec["curve"][0]["test_loss"]
    assert other["curve"][-1]["test_loss"] != rec["curve"][-1]["test_loss"]
    same = ["--data", mnist_root(), "--iterations", "30", "--eval-every", "10", "--batch-size", "20",
            "--data-limit", "300", "--test-limit", "200", "--no-progress"]
    assert main(["train", "--ticket", str(exp), "--round", "2", *same, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["curve"] == rec["curve"]  # the same settings given as flags
    assert m["ticket"] == dict(run_dir=str(exp), round=2, seed=0, weights="start", dataset="mnist",
                               start_iteration=0)
    assert main(["train", "--ticket", str(exp), "--round", "2", "--ticket-weights", "fresh", "--model-seed", "5",
                 *same, "--out", str(out)]) == 0
    fresh = json.loads(out.read_text())
    assert fresh["curve"][0]["test_loss"] != rec["curve"][0]["test_loss"]  # other weights, same masks
    assert fresh["percent_remaining"] == pytest.approx(rec["percent_remaining"])
    assert fresh["ticket"]["model_seed"] == 5
    # by default a fresh start is the reinit control's draw for that round, never the run's own theta0 (its model
    # seed, which with rewinding to iteration 0 is the ticket itself)
    from sparse_lth.imp import _reinit_seed
    assert main(["train", "--ticket", str(exp), "--round", "2", "--ticket-weights", "fresh", *same,
                 "--out", str(out)]) == 0
    default = json.loads(out.read_text())
    assert default["ticket"]["model_seed"] == _reinit_seed(0, 2)
    assert default["curve"][0]["test_loss"] not in (rec["curve"][0]["test_loss"], fresh["curve"][0]["test_loss"])
    assert main(["train", "--ticket", str(exp), "--round", "2", "--dataset", "fashion_mnist", *same,
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ticket"]["dataset"] == "fashion_mnist"
    capsys.readouterr()
    for extra, msg in ((["--round", "2", "--model", "conv2"], "leave out --model"),
                       ([], "--ticket needs --round"),
                       (["--round", "2", "--density", "0.5"], "--ticket brings its masks"),
                       (["--round", "9"], "round 9 of seed 0 has not finished"),
                       (["--round", "2", "--ticket-weights", "fresh", "--model-seed", "0"],
                        "--model-seed 0 is the run's own seed"),
                       (["--round", "2", "--model-seed", "3"], "goes with --ticket-weights fresh")):
        assert main(["train", "--ticket", str(exp), *extra, *same]) == 2
        assert msg in capsys.readouterr().err
    assert main(["train", "--round", "2", *same]) == 2
    assert "go with --ticket" in capsys.readouterr().err


def test_train_a_ticket_takes_the_runs_augmentation_split_and_epochs(tmp_path):
    """train --ticket of a run that augments its (MNIST) training set, holds out examples for early stopping and
    counts its budget in epochs: with no training flag the round trains again to the last digit, so each of those
    settings came from the run (without the augmentation, the held-out split or the epochs, the curve differs)."""
    assert main(["imp", "--preset", "lenet_quick", "--data", mnist_root(), "--runs", str(tmp_path), "--iterations",
                 "2ep", "--eval-every", "5", "--rounds", "1", "--width", "0.1", "--data-limit", "300",
                 "--test-limit", "100", "--val-split", "100", "--batch-size", "25", "--augment", "on", "--no-progress",
                 "--no-report"]) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    rec = json.loads((exp / "seed_0" / "round_01" / "metrics.json").read_text())
    assert rec["curve"][-1]["iteration"] == 16  # 2 epochs of the 200 examples left, at 25 a batch
    out = tmp_path / "t.json"
    assert main(["train", "--ticket", str(exp), "--round", "1", "--data", mnist_root(), "--no-progress",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["curve"] == rec["curve"] and m["early_stop_on"] == rec["early_stop_on"] == "val"


def test_train_iterations_in_epochs_and_the_help_shows_its_own_defaults(tmp_path, capsys):
    """train --iterations takes "N", "Nit" or "Nep" (epochs of the training set at --batch-size), refuses another
    form before loading anything, and --help shows the defaults train uses (the paper's LeNet-300-100 settings:
    Adam, lr 1.2e-3, batches of 60), not TrainConfig's."""
    out = tmp_path / "t.json"
    base = ["train", "--data", mnist_root(), "--data-limit", "100", "--test-limit", "50", "--eval-every", "1",
            "--no-progress", "--out", str(out)]
    for budget, last in (("1.5ep", 3), ("2it", 2), ("3", 3)):  # 1.5 epochs of 100 examples at 60 a batch: 2 each
        assert main([*base, "--iterations", budget]) == 0
        m = json.loads(out.read_text())
        assert m["curve"][-1]["iteration"] == last and m["curve"][0]["lr"] == pytest.approx(1.2e-3)
    capsys.readouterr()
    assert main([*base, "--iterations", "3x", "--data", str(tmp_path / "nowhere")]) == 2
    assert "--iterations must look like '500it', '2ep' or 500; got '3x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("sgd | adam | adamw (default 'adam')", "--lr FLOAT (default 0.0012)",
                  "--batch-size INT (default 60)", "--eval-every INT evaluate every N iterations (and at the start "
                  "and the end) (default 100)"):
        assert shown in help_text


def test_train_a_ticket_of_a_run_that_rewinds_late(tmp_path, capsys):
    """With late rewinding a round after 0 trains iterations k .. T: train --ticket starts there by default and
    gives the round's curve again to the last digit (it trained 0 .. T: other batches and learning rates, and k
    more steps); --start-iteration overrides it, and one at or past the end is refused."""
    assert main(tiny_imp_args(tmp_path, "--no-report", "--rewind", "10it")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    rec = json.loads((exp / "seed_0" / "round_02" / "metrics.json").read_text())
    assert rec["start_iteration"] == 10
    same = ["--data", mnist_root(), "--iterations", "30", "--eval-every", "10", "--batch-size", "20",
            "--data-limit", "300", "--test-limit", "200", "--no-progress"]
    out = tmp_path / "t.json"
    assert main(["train", "--ticket", str(exp), "--round", "2", *same, "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["curve"] == rec["curve"] and m["ticket"]["start_iteration"] == 10
    assert main(["train", "--ticket", str(exp), "--round", "2", "--start-iteration", "0", *same, "--out",
                 str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["curve"][0]["iteration"] == 0 and m["curve"] != rec["curve"]
    capsys.readouterr()
    assert main(["train", "--ticket", str(exp), "--round", "2", *same[:2], "--iterations", "10", *same[4:]]) == 2
    assert "--start-iteration 10 (the round's, where the run rewound to) is not before the end of training" in \
        capsys.readouterr().err


def test_train_command_conv_network_on_fashion_mnist(tmp_path):
    """`train --model conv2 --dataset fashion_mnist`: the network is built for the dataset's 1x28x28 images."""
    out = tmp_path / "conv.json"
    assert main(["train", "--model", "conv2", "--dataset", "fashion_mnist", "--data", mnist_root(), "--density", "0.5",
                 "--iterations", "2", "--eval-every", "2", "--batch-size", "8", "--data-limit", "64",
                 "--test-limit", "32", "--no-progress", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert set(m["paths"]) == {"features.conv1", "features.conv2", "fc1", "fc2", "fc3"}
    assert abs(m["percent_remaining"] - 50.0) < 0.01 and 0 <= m["test_acc"] <= 1


def test_export_command(tmp_path, capsys, monkeypatch):
    """export: a finished round's masks and weights as a state_dict that the plain network loads; the sparsified
    network loads it too and computes the same outputs."""
    import torch

    from sparse_lth.layers import sparse_layers, sparsify
    from sparse_lth.models import build_model
    assert main(tiny_imp_args(tmp_path, "--rounds", "1")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["export", str(exp), "--round", "1", "--weights", "final"]) == 0
    out = tmp_path / f"ticket_{exp.name}_round01_final.pt"
    assert str(out.name) in capsys.readouterr().out
    state = torch.load(out, weights_only=False)
    masks = torch.load(exp / "seed_0" / "round_01" / "masks.pt", weights_only=False)["masks"]
    assert all(torch.equal(state[f"{n}.weight_mask"], m) for n, m in masks.items())
    final = torch.load(exp / "seed_0" / "round_01" / "final.pt", weights_only=False)
    assert all(torch.equal(state[f"{n}.weight"], final[f"{n}.weight"]) for n in masks)
    plain = build_model("lenet300_100", width=0.1)
    plain.load_state_dict(state, strict=False)
    sparse = sparsify(build_model("lenet300_100", width=0.1))
    sparse.load_state_dict(state)
    assert all(torch.equal(m.weight_mask, masks[n]) for n, m in sparse_layers(sparse))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(plain(x), sparse(x))
    assert main(["export", str(exp), "--round", "2"]) == 2
    assert "round 2 of seed 0 has not finished" in capsys.readouterr().err


def test_train_command_ops_and_timed_paths(tmp_path, capsys):
    """--ops forces the sparse path's ops (recorded as path labels); --timed-paths times the auto choice on the
    CPU; a bad --ops is a clear error (exit 2)."""
    common = ["train", "--data", mnist_root(), "--density", "0.05", "--iterations", "4", "--eval-every", "2",
              "--data-limit", "200", "--test-limit", "100", "--no-progress"]
    out = tmp_path / "ops.json"
    assert main(common + ["--path", "sparse", "--ops", "weight_grad=dense", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["paths"].values()) == {"sparse/weight_grad:dense"}
    out = tmp_path / "timed.json"
    assert main(common + ["--timed-paths", "--out", str(out)]) == 0
    paths = json.loads(out.read_text())["paths"]
    assert set(paths) == {"fc1", "fc2", "fc3"}
    assert all(p == "dense" or p.startswith("sparse") for p in paths.values())
    capsys.readouterr()
    assert main(common + ["--ops", "weight_grad:dense"]) == 2
    assert "op=impl pairs" in capsys.readouterr().err


def test_hyperparameter_flags_carry_their_fields_comments(capsys):
    """Every dataclass flag's help is its field's comment in the source, then its default."""
    with pytest.raises(SystemExit):
        main(["imp", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--prune-fc FLOAT fraction of the SURVIVING weights pruned per round, per layer type (default 0.2)" in text
    assert "--milestones A,B,... comma-separated ints: lr multiplied by gamma at these iterations (default ())" in text
    assert "--timed-paths, --no-timed-paths choose \"auto\" paths by timing on any device" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--momentum FLOAT sgd only (default 0.0)" in " ".join(capsys.readouterr().out.split())


def test_bad_numbers_and_conflicting_flags_are_usage_errors(tmp_path, capsys):
    """Out-of-range numbers are refused by the parser (exit 2, the flag named); flags that cannot act together
    are refused before any data is loaded or anything is trained."""
    for argv, msg in ((["imp", "--replicates", "0"], "--replicates: must be >= 1"),
                      (["imp", "--threads", "-1"], "--threads: must be >= 1"),
                      (["imp", "--checkpoint-every", "-5"], "--checkpoint-every: must be >= 0"),
                      (["train", "--density", "1.5"], "--density: the fraction of weights kept must lie in (0, 1]"),
                      (["train", "--density", "-0.5"], "--density: the fraction"),
                      (["train", "--data-limit", "-5"], "--data-limit: must be >= 0"),
                      (["stability", "x", "--bn-reset", "-1"], "--bn-reset: must be >= 0"),
                      (["stability", "x", "--points", "1"], "--points: must be >= 2"),
                      (["landscape", "x", "--top", "0"], "--top: must be >= 1"),
                      # far more threads than cores crashed torch (a segfault, after the output)
                      (["env", "--threads", "100000"], "--threads: must be <= "),
                      (["imp", "--milestones", "1,,2"], "an empty item in '1,,2'"),
                      (["imp", "--milestones", "a,b"], "--milestones: expected comma-separated ints, got 'a,b'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    missing = str(tmp_path / "no_data")  # none of these gets as far as loading it
    for argv, msg in ((["train", "--layers", "dense", "--density", "0.1"], "--density needs --layers sparse"),
                      (["train", "--layers", "masked", "--path", "sparse"], "--path choose how sparse layers run"),
                      (["train", "--out", str(tmp_path / "nope" / "m.json")], "its folder does not exist"),
                      (["train", "--device", "foo"], "--device foo"),
                      (["imp", "--device", "foo", "--runs", str(tmp_path)], "--device foo"),
                      # devices torch names but a run cannot use: refused before anything is written (they
                      # failed after init.pt; the device does not name the experiment, so in its real folder)
                      (["imp", "--device", "cpu:1", "--runs", str(tmp_path)], "there is one CPU device"),
                      (["imp", "--device", "meta", "--runs", str(tmp_path)], "runs go on 'cpu' or 'cuda'"),
                      (["train", "--out", str(tmp_path)], "is a folder; give a file name"),
                      (["imp", "--model", "user_models:small_cnn", "--runs", str(tmp_path)], "give its dataset"),
                      (["train", "--model", "user_models:small_cnn"], "give its dataset"),
                      (["imp", "--model", "user_models:nope", "--dataset", "mnist", "--runs", str(tmp_path)],
                       "user_models has no attribute 'nope'")):
        assert main(argv + ["--data", missing]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []
    # sparse-layer flags with plain masked layers: a note (folders made so before must still resume)
    assert main(["imp", "--layer-impl", "masked", "--path", "sparse", "--runs", str(tmp_path), "--data", missing]) == 2
    out = capsys.readouterr()
    assert "note: --path set how sparse layers run" in out.out and "not found" in out.err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_and_runtime_errors_are_one_line(monkeypatch, capsys):
    import sparse_lth.cli as cli

    def interrupted(args, names):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_imp", interrupted)
    assert main(["imp"]) == 130
    assert capsys.readouterr().err.strip() == "sparse-lth imp: interrupted; run the same command again to resume"

    def broken(args, names):
        raise RuntimeError("backend 'triton' needs CUDA tensors")

    monkeypatch.setattr(cli, "_cmd_imp", broken)
    assert main(["imp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-lth imp: error: backend 'triton' needs CUDA tensors") and "SPARSE_LTH_DEBUG" in err

    def taken(args, names):  # another process runs it: nothing to debug, no hint
        from sparse_lth.runlock import RunInProgressError
        raise RunInProgressError("runs/x/seed_0 is being run by another process (pid 7)")

    monkeypatch.setattr(cli, "_cmd_imp", taken)
    assert main(["imp"]) == 2
    assert capsys.readouterr().err.strip() == \
        "sparse-lth imp: error: runs/x/seed_0 is being run by another process (pid 7)"
    monkeypatch.setattr(cli, "_cmd_imp", broken)
    monkeypatch.setenv("SPARSE_LTH_DEBUG", "1")
    with pytest.raises(RuntimeError):  # the traceback, for a bug report
        main(["imp"])


def test_env_prints_what_a_run_records(capsys):
    import torch
    assert main(["env", "--device", "cpu", "--threads", "1", "--json"]) == 0  # (one_thread restores the count)
    env = json.loads(capsys.readouterr().out)["cpu"]
    assert env["threads"] == 1 and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and f", {env['cpu_capability']}, " in out and "ATEN_CPU_CAPABILITY=avx2" in out
    rc = main(["env", "--device", "cuda"])
    if torch.cuda.is_available():
        assert rc == 0 and "torch" in capsys.readouterr().out
    else:
        assert rc == 2 and "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["imp", "train"])
def test_cuda_graph_needs_a_cuda_device(command, tmp_path, capsys):
    """--cuda-graph captures the training step on a GPU: with another device it is refused before anything runs."""
    args = [command, "--cuda-graph", "--device", "cpu", "--data", str(tmp_path)]
    if command == "imp":
        args += ["--runs", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "--cuda-graph captures the training step as a CUDA graph: it needs --device cuda, not cpu" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sigterm_stops_an_imp_run_with_a_checkpoint_and_it_resumes_there(tmp_path, capsys):
    """`kill` (a cluster's preemption) of a running `sparse-lth imp`: it ends after the step under way with a
    checkpoint at that iteration, exit status 128 + 15, and the same command resumes from that iteration."""
    args = tiny_imp_args(tmp_path, "--iterations", "2000it", "--checkpoint-every", "100", "--eval-every", "500",
                         "--rounds", "1", "--threads", "1")
    p = subprocess.Popen([sys.executable, "-m", "sparse_lth.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        while not first.startswith("experiment folder: "):
            assert first, p.stderr.read()
            first = p.stdout.readline()
        exp = first.split(": ", 1)[1].strip()
        round0 = os.path.join(exp, "seed_0", "round_00")
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(round0, "checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.02)  # until round 0 is training (its first checkpoint, at iteration 100)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    said = re.search(r"sparse-lth imp: stopped by SIGTERM at iteration (\d+), checkpoint written \((.*)\); run the "
                     r"same command again to resume", err)
    assert said, err
    stopped_at = int(said.group(1))
    assert said.group(2) == os.path.join(round0, "checkpoint.pt") and 100 <= stopped_at < 2000
    assert torch.load(said.group(2), weights_only=False)["iteration"] == stopped_at
    assert main(args) == 0
    capsys.readouterr()
    with open(os.path.join(round0, "metrics.json")) as f:
        assert json.load(f)["resumed_from"] == stopped_at
    assert os.path.exists(os.path.join(exp, "seed_0", "round_01", "metrics.json"))


def test_imp_plan_prints_the_schedule_and_writes_nothing(tmp_path, capsys):
    assert main(tiny_imp_args(tmp_path, "--plan")) == 0
    out = capsys.readouterr().out.splitlines()
    assert list(tmp_path.iterdir()) == []
    assert out[0].startswith(f"experiment folder: {tmp_path}/lenet300_100_imp_") and out[0].endswith(" (new)")
    assert out[1] == "  seed 0: 0 of 3 rounds done; round 0 next"
    assert "prunable weights: fc " in out[2] and "output " in out[2]
    assert "30 iterations, rewind to iteration 0; 3 rounds = 90 iterations per seed" in out[4]
    assert out[5].startswith("early stopping: at the minimum test loss")
    table = out[out.index(next(ln for ln in out if ln.split()[:2] == ["round", "%"])) + 1:-1]
    assert [ln.split()[0] for ln in table] == ["0", "1", "2"] and table[0].split()[1] == "100.00"
    assert out[-1] == "nothing trained or written (--plan)"
    assert main(tiny_imp_args(tmp_path)) == 0  # the run, then the plan of the same command: all done
    capsys.readouterr()
    assert main(tiny_imp_args(tmp_path, "--plan")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(" (exists)") and out[1] == "  seed 0: 3 of 3 rounds done; nothing left to train"
    assert "(layer-wise); control imp" in out[3]
    assert main(tiny_imp_args(tmp_path, "--plan", "--prune-score", "movement")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(" (new)") and "(layer-wise, by movement since the rewind point); control imp" in out[3]
    assert main(tiny_imp_args(tmp_path, "--plan", "--val-split", "50")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(" (new)") and out[5] == ("early stopping: at the minimum loss of 50 training examples "
                                                    "held out for validation (trained on the others)")
    # a validation split that leaves nothing to train on is refused by --plan (it does not read the data): one of
    # the --data-limit, and one of the whole training set (60,000 MNIST images: the run refused it)
    assert main(tiny_imp_args(tmp_path, "--plan", "--val-split", "300")) == 2
    assert "val_split=300: cannot hold out 300 of 300 training examples (data_limit)" in capsys.readouterr().err
    assert main(["imp", "--preset", "lenet_quick", "--runs", str(tmp_path / "vs"), "--plan", "--val-split",
                 "60000"]) == 2
    assert "cannot hold out 60000 of 60000 training examples: at least one" in capsys.readouterr().err
    assert main(["imp", "--preset", "lenet_quick", "--runs", str(tmp_path / "vs"), "--plan", "--val-split",
                 "59999"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "vs").exists()
    # a misspelt dataset is refused by --plan as by the run itself (the plan printed it)
    assert main(tiny_imp_args(tmp_path, "--plan", "--dataset", "fashoin_mnist")) == 2
    assert "unknown dataset 'fashoin_mnist'" in capsys.readouterr().err
    # a control planned before its IMP run: the plan, and what would stop the run now
    assert main(tiny_imp_args(tmp_path / "ctl", "--plan", "--control", "reinit")) == 0
    out = capsys.readouterr().out
    assert "note: started now, the run would stop before training: control 'reinit' needs the IMP ticket's masks" \
        in out and out.rstrip().endswith("nothing trained or written (--plan)")
    assert not (tmp_path / "ctl").exists()
    # so is a model that cannot take the dataset's examples (the plan printed 16 rounds; the run then refused it)
    assert main(["imp", "--model", "torchvision.models:resnet18", "--dataset", "mnist", "--runs",
                 str(tmp_path / "r18"), "--plan"]) == 2
    assert "does not take mnist's examples (shape (1, 28, 28))" in capsys.readouterr().err
    assert not (tmp_path / "r18").exists()


def test_a_closed_output_pipe(tmp_path, monkeypatch, capsys):
    """`| head` on a command that only prints ends it without an error (0); on a command that works (imp) the pipe's
    reader is gone before it finished: that is not success (it returned 0, as if the run had ended)."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["env"]) == 0
    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(tiny_imp_args(tmp_path)) == 141
    assert "its output pipe closed" in capsys.readouterr().err


def test_seed_and_round_lists_name_each_once():
    """`--seeds 0,0` analysed seed 0 twice (and `--rounds 2,2` a round twice): each value once, in the order
    given; lists of other flags keep what they are given."""
    from sparse_lth.cli import build_parser
    parser, _ = build_parser()
    args = parser.parse_args(["stability", "x", "--seeds", "1,0,1", "--rounds", "2,2,0"])
    assert args.seeds == (1, 0) and args.rounds == (2, 0)
    assert parser.parse_args(["report", "x", "--seeds", "0,0"]).seeds == (0,)
    assert parser.parse_args(["imp", "--milestones", "5,5"]).milestones == (5, 5)  # as given (train refuses it)


def test_a_file_as_an_output_folder_is_refused_at_once(tmp_path, capsys):
    """report, overlap and the analyses write a folder at --out: a file there is refused before any work, naming
    --out (it failed at the end with "[Errno 17] File exists")."""
    out = tmp_path / "a_file"
    out.write_text("")
    for argv in (["report", str(tmp_path)], ["overlap", str(tmp_path), str(tmp_path)], ["stability", str(tmp_path)],
                 ["landscape", str(tmp_path)], ["anatomy", str(tmp_path)]):
        assert main(argv + ["--out", str(out)]) == 2, argv
        assert f"--out {out}: is a file; {argv[0]} writes a folder there" in capsys.readouterr().err, argv


def test_python_dash_m_runs_the_command_line_from_a_checkout(tmp_path):
    """`python -m sparse_lth ...` is the `sparse-lth` script, also from a source checkout on PYTHONPATH (no
    install): its exit status is the command's."""
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "sparse_lth", "train", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and "usage: sparse-lth train" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sparse_lth", "train", "--iterations", "3x"], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "--iterations must look like" in r.stderr


def test_a_warning_to_the_command_line_user_is_one_line(monkeypatch, capsys):
    """A warning raised while a command runs prints as one line naming the command and the warning's class, not
    the library's file, line number and source line; Python's own format is back once the command returns."""
    import warnings

    import sparse_lth.cli as cli

    def warns(args):
        warnings.warn("resumes under other numerics than before: threads 1 -> 2", RuntimeWarning)
        return 0

    monkeypatch.setattr(cli, "_cmd_env", warns)
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # print as Python does outside pytest (which records warnings instead): through warnings.formatwarning
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        assert main(["env"]) == 0
    err = capsys.readouterr().err
    assert err == "sparse-lth env: RuntimeWarning: resumes under other numerics than before: threads 1 -> 2\n"
    assert warnings.formatwarning is before

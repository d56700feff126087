"""`sparse-lth ls`: the experiments of a run root, what tells them apart, and how far each got."""
import dataclasses
import json
import os
import shutil

import pytest

from conftest import tiny_data
from sparse_lth.cli import main
from sparse_lth.listing import format_listing, list_experiments
from test_imp import run, tiny_hp


class Stop(Exception):
    pass


def test_ls_lists_finished_and_interrupted_experiments(tmp_path, capsys):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=2)
    done = run(hp, tmp_path, data=data)
    run(dataclasses.replace(hp, control="reinit"), tmp_path, data=data)

    def stop(r, it, m):  # killed in round 1 at iteration 10 (a checkpoint every 5)
        if r == 1 and it == 10:
            raise Stop

    with pytest.raises(Stop):
        run(dataclasses.replace(hp, prune_fc=0.5), tmp_path, data=data, callback=stop)
    rows = {r["name"]: r for r in list_experiments([str(tmp_path)])}
    assert len(rows) == 3
    imp = rows[os.path.basename(done.experiment_dir)]
    assert imp["state"] == "done" and imp["planned"] == 3 and imp["seeds"][0]["done"] == 3
    last = done.metrics[0][2]
    assert imp["seeds"][0]["last"] == (2, last["percent_remaining"], last["early_stop_test_acc"])
    best = max(done.metrics[0], key=lambda m: m["early_stop_test_acc"])
    assert imp["seeds"][0]["best"][2] == best["early_stop_test_acc"]
    half = next(r for r in rows.values() if r["control"] == "imp" and r is not imp)
    assert half["seeds"][0]["done"] == 1 and half["seeds"][0]["running"] == (1, 10, 20)
    # the time to go, at the pace of the rounds trained so far: 1.5 rounds left at round 0's wall time
    wall0 = json.load(open(os.path.join(half["dir"], "seed_0", "round_00", "metrics.json")))["wall_time"]
    assert half["seeds"][0]["eta"] == pytest.approx(1.5 * wall0) and imp["seeds"][0]["eta"] is None
    assert half["state"].startswith("seed 0: round 1 at iteration 10/20, about ") and \
        " to go, stopped (last write " in half["state"] and half["state"].endswith(" ago)")
    # what tells them apart: the pruning rate between the two IMP runs; the reinit control shares the first's
    assert half["differs"] == ["prune_fc=0.5"] and imp["differs"] == ["prune_fc=0.2"]
    reinit = next(r for r in rows.values() if r["control"] == "reinit")
    assert reinit["differs"] == ["prune_fc=0.2"] and reinit["state"] == "done"
    # the command: one line per experiment, its differences under it
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["experiment", "control", "seed", "rounds"]
    line = next(ln for ln in out if ln.startswith(half["name"]))
    assert line.split()[1:4] == ["imp", "0", "1/3"] and "round 1 at iteration 10/20" in line
    assert out[out.index(line) + 1] == "  prune_fc=0.5"
    assert main(["ls", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in listed) == sorted(rows)
    # a second replicate, unfinished: each seed's line says where it stands
    shutil.copytree(os.path.join(imp["dir"], "seed_0"), os.path.join(imp["dir"], "seed_1"))
    shutil.rmtree(os.path.join(imp["dir"], "seed_1", "round_02"))
    two = next(r for r in list_experiments([str(tmp_path)]) if r["name"] == imp["name"])
    walls = [m["wall_time"] for m in done.metrics[0]] + [m["wall_time"] for m in done.metrics[0][:2]]  # both seeds
    assert two["seeds"][0]["state"] == "done" and two["seeds"][1]["state"].startswith("round 2 next, about ")
    assert two["seeds"][1]["eta"] == pytest.approx(sum(walls) / len(walls))  # the pace of all its rounds
    assert two["state"].startswith("seed 1: round 2 next, about ") and "(last write " in two["state"]
    text = format_listing([two]).splitlines()
    assert text[1].split()[1:4] == ["imp", "0", "3/3"] and text[1].endswith("done")
    assert text[2].split()[:2] == ["1", "2/3"] and "round 2 next, about " in text[2] and "last write" in text[2]
    os.remove(os.path.join(half["dir"], "seed_0", "round_01", "checkpoint.pt"))  # begun, not yet checkpointed
    again = next(r for r in list_experiments([str(tmp_path)]) if r["name"] == half["name"])
    assert again["seeds"][0]["running"] == (1, None, None)
    assert again["state"].startswith("seed 0: round 1 begun (no checkpoint to read), about ")
    shutil.rmtree(os.path.join(half["dir"], "seed_0", "round_01"))  # between rounds
    again = next(r for r in list_experiments([str(tmp_path)]) if r["name"] == half["name"])
    assert again["seeds"][0]["running"] is None and again["state"].startswith("seed 0: round 1 next, about ")
    assert again["seeds"][0]["eta"] == pytest.approx(2 * wall0)


def test_ls_compares_a_controls_own_settings_among_that_controls_experiments(tmp_path):
    """An IMP run, its reinit control and two one-shot runs (to each IMP level, and at once): oneshot_levels tells
    the two one-shot runs apart, not the IMP run or reinit from anything (they showed "oneshot_levels=False")."""
    for name, kw in (("imp", {}), ("reinit", dict(control="reinit")),
                     ("levels", dict(control="oneshot", oneshot_levels=True)), ("once", dict(control="oneshot"))):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "hparams.json", "w") as f:
            json.dump(dict(model="lenet300_100", rounds=3, **kw), f)
    rows = {r["name"]: r["differs"] for r in list_experiments([str(tmp_path)])}
    assert rows == dict(imp=[], reinit=[], levels=["oneshot_levels=True"], once=["oneshot_levels=False"])


def test_ls_of_an_experiment_not_started_and_of_nothing(tmp_path, capsys):
    os.makedirs(tmp_path / "e")
    with open(tmp_path / "e" / "hparams.json", "w") as f:
        json.dump(dict(model="lenet300_100", control="oneshot", rounds=5), f)
    rows = list_experiments([str(tmp_path / "e")])
    assert rows[0]["planned"] == 2 and rows[0]["state"].startswith("not started (last write ")
    assert rows[0]["differs"] == []
    assert "e  " in format_listing(rows).splitlines()[1]
    assert format_listing([]) == "no experiments"
    os.makedirs(tmp_path / "root" / "inner" / "f")  # a run root inside a run root: found at any depth
    os.rename(tmp_path / "e", tmp_path / "root" / "inner" / "e")
    assert [r["name"] for r in list_experiments([str(tmp_path / "root")])] == ["e"]
    assert main(["ls", str(tmp_path / "root" / "inner" / "f")]) == 2
    assert "no experiment folders" in capsys.readouterr().err
    assert main(["ls", str(tmp_path / "nothing")]) == 2  # a folder that is not there: a clear error
    assert "no such folder" in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_no_error(tmp_path):
    """`sparse-lth ls | head -1`: the reader has gone before the table is written; no error, no traceback."""
    import subprocess
    import sys
    os.makedirs(tmp_path / "e")
    with open(tmp_path / "e" / "hparams.json", "w") as f:
        json.dump(dict(model="lenet300_100"), f)
    p = subprocess.Popen([sys.executable, "-c", "import sys; from sparse_lth.cli import main; sys.exit(main())",
                          "ls", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the child (still importing) writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == ""


def test_the_eta_leaves_out_a_dense_round_reused_from_another_run(tmp_path):
    """A round taken from another run took no time here: its wall_time is not part of the estimate."""
    from sparse_lth.listing import experiment_status
    res = run(tiny_hp(rounds=2), tmp_path, data=tiny_data(240, 120))
    sdir = os.path.join(res.experiment_dir, "seed_0")
    shutil.rmtree(os.path.join(sdir, "round_02"))
    p0 = os.path.join(sdir, "round_00", "metrics.json")
    m0 = json.load(open(p0))
    m0.update(reused_from="elsewhere", wall_time=1e6)
    json.dump(m0, open(p0, "w"))
    wall1 = json.load(open(os.path.join(sdir, "round_01", "metrics.json")))["wall_time"]
    st = experiment_status(res.experiment_dir)
    assert st["seeds"][0]["eta"] == pytest.approx(wall1)

"""One process per replicate folder: a second run of the same experiment is refused while the first lives, and
`sparse-lth ls` tells a running replicate from a stopped one."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import tiny_data
from sparse_lth.cli import main
from sparse_lth.listing import format_listing, list_experiments
from sparse_lth.runlock import LOCK_NAME, RunInProgressError, hold, lock_state
from test_imp import run, tiny_hp

HOLDER = """
import sys, time
from sparse_lth.runlock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


class Stop(Exception):
    pass


def hold_in_another_process(seed_dir):
    """A live process holding ``seed_dir``'s lock (as a run of it would), once it has said so."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, seed_dir], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_in_one_process(tmp_path):
    d = str(tmp_path / "seed_0")
    assert lock_state(d) == dict(state="unknown")  # never run by a version that locks
    with hold(d):
        state = lock_state(d)
        assert state["state"] == "running" and state["pid"] == os.getpid() and state["since"].endswith("UTC")
        with pytest.raises(RunInProgressError, match=f"being run by another process \\(pid {os.getpid()} on "):
            with hold(d, patience=0.2):
                pass
        assert lock_state(d)["state"] == "running"  # the refused attempt did not take it away
    assert lock_state(d)["state"] == "stopped" and lock_state(d)["pid"] == os.getpid()  # the last holder
    with hold(d):  # free again: a resume takes it
        assert lock_state(d)["state"] == "running"


def test_a_second_process_on_a_run_is_refused_and_ls_says_which_runs(tmp_path, capsys):
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=2)

    def stop(r, it, m):
        if r == 1 and it == 10:
            raise Stop

    with pytest.raises(Stop):
        run(hp, tmp_path, data=data, callback=stop)
    exp_dir = next(e.path for e in os.scandir(tmp_path) if e.is_dir())
    seed_dir = os.path.join(exp_dir, "seed_0")
    assert os.path.exists(os.path.join(seed_dir, LOCK_NAME))
    row = list_experiments([str(tmp_path)])[0]
    assert row["seeds"][0]["process"]["state"] == "stopped" and ", stopped (last write" in row["state"]
    assert "iteration 10/20, about " in format_listing([row]) and "(stopped; last write " in format_listing([row])

    ck = os.path.join(seed_dir, "round_01", "checkpoint.pt")
    before = os.stat(ck).st_mtime_ns
    holder = hold_in_another_process(seed_dir)
    try:
        with pytest.raises(RunInProgressError, match=f"pid {holder.pid} on .*: python[0-9.]* -c "):
            run(hp, tmp_path, data=data)
        assert os.stat(ck).st_mtime_ns == before  # refused before it wrote anything
        assert not os.path.exists(os.path.join(seed_dir, "round_02"))
        row = list_experiments([str(tmp_path)])[0]
        process = row["seeds"][0]["process"]
        assert process["state"] == "running" and process["pid"] == holder.pid
        assert main(["ls", str(tmp_path)]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(row["name"]))
        assert f"(running: pid {holder.pid} on " in line and "; last write " in line
        # another replicate of the same experiment is another folder: not blocked
        other = run(hp, tmp_path, data=data, seeds=[1])
        assert other.experiment_dir == exp_dir and len(other.metrics[1]) == 3
    finally:
        holder.send_signal(signal.SIGKILL)  # killed, not ended cleanly: the kernel drops its lock all the same
        holder.wait()
    assert lock_state(seed_dir)["state"] == "stopped" and lock_state(seed_dir)["pid"] == holder.pid
    res = run(hp, tmp_path, data=data)  # the resume now goes on
    assert len(res.metrics[0]) == 3 and not os.path.exists(ck)
    assert lock_state(seed_dir)["pid"] == os.getpid() and lock_state(seed_dir)["state"] == "stopped"
    assert list_experiments([str(tmp_path)])[0]["state"] == "done"


def test_a_failed_save_leaves_no_temporary_and_a_resume_removes_a_killed_ones(tmp_path):
    from sparse_lth.train import save_atomic
    target = tmp_path / "x.pt"
    with pytest.raises(Exception):
        save_atomic({"f": lambda: 0}, str(target))  # cannot be pickled: fails half-way through the write
    assert list(tmp_path.iterdir()) == []

    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1)
    res = run(hp, tmp_path / "runs", data=data)
    seed_dir = os.path.join(res.experiment_dir, "seed_0")
    dead = 2**22 + 4242  # above Linux's pid_max: no live process wrote these (a live writer's are kept)
    stale = [os.path.join(seed_dir, f"rewind.pt.tmp{dead}"), os.path.join(seed_dir, "round_01", f"final.pt.tmp{dead}")]
    analysis = os.path.join(seed_dir, "round_01", "stability", "copy_3.pt.tmp99")  # another command's, below
    kept = [os.path.join(seed_dir, "round_01", "notes.tmp"), analysis]
    os.makedirs(os.path.dirname(analysis))
    for p in stale + kept:
        with open(p, "wb") as f:
            f.write(b"half")
    run(hp, tmp_path / "runs", data=data)  # nothing left to train; the folder is tidied under its lock
    assert [os.path.exists(p) for p in stale + kept] == [False, False, True, True]


def test_a_filesystem_without_locks_warns_and_runs(monkeypatch, tmp_path):
    import errno

    import sparse_lth.runlock as runlock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(UserWarning, match="this filesystem does not lock"):
        with hold(str(tmp_path / "seed_0")):
            ran.append(1)
    assert ran == [1] and lock_state(str(tmp_path / "seed_0")) == dict(state="unknown")

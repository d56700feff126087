"""What the experiments in a run root are, and how far each has got (``sparse-lth ls``), read from their files.

``list_experiments(paths)`` gives one dict per experiment folder (see :func:`experiment_status`);
``format_listing(rows)`` lays them out as a table. Nothing is trained or written; a round in progress is read off
its checkpoint (memory-mapped: only the iteration and the configuration are read, not the weights).
"""
from __future__ import annotations

import glob
import os
import time

from . import runlock
from ._files import read_json


def _planned_rounds(hp: dict) -> int:
    """Rounds an experiment runs, the dense round 0 included (one-shot without levels: 0 and 1)."""
    from .imp import ImpHparams
    if hp.get("control") == "oneshot" and not hp.get("oneshot_levels"):
        return 2
    return int(hp.get("rounds", ImpHparams.rounds)) + 1


def checkpoint_progress(path: str) -> tuple[int, int] | None:
    """(iteration, iterations) of a round's checkpoint, or None if it cannot be read (being written, damaged)."""
    import torch
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(ck["iteration"]), int(ck["config"]["iterations"])
    except Exception:  # (a half-written file, another format: the listing says the round has begun, no more)
        return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"


def _alive(info: dict, sep: str) -> str:
    """Whether a replicate's process is running, as a few words ("running: pid ..." or "stopped") followed by
    ``sep``; "" when its folder cannot tell (written before runs locked their folders)."""
    words = runlock.describe(info["process"]) if info.get("process") else None
    return words + sep if words else ""


def experiment_status(exp_dir: str, now: float | None = None) -> dict:
    """One experiment folder: ``dict(dir, name, control, model, dataset, hparams, planned (rounds per seed, round 0
    included), seeds={seed: dict(done, last, best, running, eta, state)}, state, last_write)``. Per seed: ``done``
    rounds with metrics.json, ``last`` (round, percent remaining, test accuracy at early stop) of the last one,
    ``best`` (the same for the best accuracy at early stop), ``running`` (round, iteration, iterations) of a round
    begun and not finished (iteration and iterations None until it has a checkpoint), ``eta``: seconds left at the
    mean wall time of the experiment's rounds trained so far (None before one has finished), ``process``: whether
    a live process is running it (:func:`sparse_lth.runlock.lock_state`: state "running" with its pid, host, start
    and command, "stopped", or "unknown" for a folder written before runs locked their folders), ``state``: "done"
    or where it stands. ``state``: "done", "not started", or where each unfinished replicate stands and whether it
    is running, with the time of the last write."""
    from .imp import replicate_seeds
    now = time.time() if now is None else now
    hp = read_json(os.path.join(exp_dir, "hparams.json"))
    planned = _planned_rounds(hp)
    seeds: dict[int, dict] = {}
    last_write = os.path.getmtime(os.path.join(exp_dir, "hparams.json"))
    walls = []  # the wall times of the rounds trained here (not a round 0 taken from another run), all seeds
    for seed in replicate_seeds(exp_dir):
        info = dict(done=0, last=None, best=None, running=None, eta=None, state="done",
                    process=runlock.lock_state(os.path.join(exp_dir, f"seed_{seed}")))
        for rdir in sorted(glob.glob(os.path.join(exp_dir, f"seed_{seed}", "round_*"))):
            for f in os.scandir(rdir):
                try:
                    last_write = max(last_write, f.stat().st_mtime)
                except FileNotFoundError:  # renamed or removed by the run since the scan (a temporary, a checkpoint)
                    pass
            mpath = os.path.join(rdir, "metrics.json")
            if os.path.exists(mpath):
                m = read_json(mpath)
                point = (int(m["round"]), float(m["percent_remaining"]), float(m["early_stop_test_acc"]))
                info["done"] += 1
                info["last"] = point
                if not m.get("reused_from") and m.get("wall_time"):
                    walls.append(float(m["wall_time"]))
                if info["best"] is None or point[2] > info["best"][2]:
                    info["best"] = point
            else:  # begun: its masks are written; iteration and budget from a checkpoint, if one was written
                ck = os.path.join(rdir, "checkpoint.pt")
                prog = checkpoint_progress(ck) if os.path.exists(ck) else None
                info["running"] = (int(os.path.basename(rdir)[6:]),) + (prog if prog else (None, None))
        seeds[seed] = info
    for info in seeds.values():
        if info["done"] >= planned:
            continue
        run = info["running"]
        if run and run[1] is not None:
            info["state"] = f"round {run[0]} at iteration {run[1]}/{run[2]}"
        elif run:
            info["state"] = f"round {run[0]} begun (no checkpoint to read)"
        else:
            info["state"] = f"round {info['done']} next"
        if walls:  # seconds to finish this seed at the mean pace of the rounds so far
            part = run[1] / run[2] if run and run[1] is not None and run[2] else 0.0
            info["eta"] = sum(walls) / len(walls) * (planned - info["done"] - part)
            info["state"] += f", about {_duration(info['eta'])} to go"
    unfinished = {s: i for s, i in seeds.items() if i["done"] < planned}
    if not seeds:
        state = "not started"
    elif not unfinished:
        state = "done"
    else:
        state = "; ".join(f"seed {s}: " + ", ".join(filter(None, (i["state"], _alive(i, ""))))
                          for s, i in unfinished.items())
    if state != "done":
        state += f" (last write {_ago(now - last_write)})"
    return dict(dir=os.path.normpath(exp_dir), name=os.path.basename(os.path.normpath(exp_dir)),
                control=hp.get("control", "imp"), model=hp.get("model", ""), dataset=hp.get("dataset", ""),
                hparams=hp, planned=planned, seeds=seeds, state=state, last_write=last_write,
                last_write_ago=_ago(now - last_write))


def find_experiments_below(paths) -> list[str]:
    """Experiment folders (with hparams.json) among ``paths`` and in the folders below them, at any depth (run
    roots inside run roots); an experiment folder's own subfolders are not searched."""
    out = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p}: no such folder")
        found = []
        for d, subdirs, files in os.walk(p):
            if "hparams.json" in files:
                found.append(os.path.normpath(d))
                subdirs[:] = []
            else:
                subdirs.sort()
        if not found:
            raise FileNotFoundError(f"{p}: no experiment folders (with hparams.json) in it or below it")
        out.extend(found)
    return list(dict.fromkeys(out))


def list_experiments(paths, now: float | None = None) -> list[dict]:
    """:func:`experiment_status` of every experiment among ``paths`` (experiment folders, or folders holding
    them at any depth), by model then name; each with ``differs``: the hyperparameters in which it differs from
    the other experiments of its model and dataset (the control aside; a control's own settings, such as
    oneshot_levels, among the experiments of its control), as ``key=value`` strings."""
    from .imp import CONTROL_SETTINGS, NOT_HASHED, ImpHparams, hparams_dict
    from .report import differing_hparams
    rows = [experiment_status(d, now) for d in find_experiments_below(list(paths))]
    rows.sort(key=lambda r: (r["model"], r["dataset"], r["name"]))
    not_control = tuple(k for k in hparams_dict(ImpHparams()) if k not in CONTROL_SETTINGS)
    for r in rows:
        peers = [p for p in rows if (p["model"], p["dataset"]) == (r["model"], r["dataset"])]
        r["differs"] = differing_hparams(r["hparams"], [p["hparams"] for p in peers],
                                         skip=("control", *NOT_HASHED, *CONTROL_SETTINGS)) + \
            differing_hparams(r["hparams"], [p["hparams"] for p in peers if p["control"] == r["control"]],
                              skip=not_control)
    return rows


def format_listing(rows: list[dict]) -> str:
    """The rows of :func:`list_experiments` as a text table: one line per experiment (per replicate where it has
    several), and under it the hyperparameters that tell it apart."""
    if not rows:
        return "no experiments"
    head = ("experiment", "control", "seed", "rounds", "last: % left", "acc@ES", "best acc@ES (% left)", "state")
    lines = []
    for r in rows:
        seeds = r["seeds"] or {None: dict(done=0, last=None, best=None, state=r["state"])}
        for i, (s, info) in enumerate(seeds.items()):
            last, best = info["last"], info["best"]
            state = info["state"] if s is None or info["state"] == "done" else \
                f"{info['state']} ({_alive(info, '; ')}last write {r['last_write_ago']})"
            lines.append((r["name"] if i == 0 else "", r["control"] if i == 0 else "", "-" if s is None else str(s),
                          f"{info['done']}/{r['planned']}",
                          f"{last[1]:.2f}" if last else "-", f"{100 * last[2]:.2f}" if last else "-",
                          f"{100 * best[2]:.2f} ({best[1]:.1f})" if best else "-",
                          state))
        if r["differs"]:
            lines.append(("  " + ", ".join(r["differs"]),))
    widths = [max(len(head[c]), *(len(ln[c]) for ln in lines if len(ln) > 1)) for c in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for ln in lines:
        out.append(ln[0] if len(ln) == 1 else "  ".join(v.ljust(w) for v, w in zip(ln, widths)).rstrip())
    return "\n".join(out)

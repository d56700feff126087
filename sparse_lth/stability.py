"""Linear mode connectivity and instability analysis (Frankle, Dziugaite, Roy & Carbin, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis", ICML 2020).

A network is *stable* to SGD noise at iteration k when two copies trained on from it with different SGD noise
(data order and augmentation) reach minima joined by a straight line along which the error does not rise. The
*error barrier* of a path is the largest error on it minus the mean of its two ends' errors; a barrier near 0
means the two minima are linearly connected. The paper finds that IMP subnetworks reach the dense network's
accuracy exactly when they are stable at their rewind point.

- :func:`interpolate_state` and :func:`linear_path` evaluate ``(1 - a) * A + a * B`` at evenly spaced ``a``,
  for any model, on test data and on a training subset; :func:`error_barrier` reads the barrier off a path.
- :func:`instability` runs the analysis on a round of an IMP experiment: it takes the round's mask and its
  starting weights at the rewind iteration (round 0: the dense network at the rewind point), trains two copies
  with the noise seeds given (through :func:`sparse_lth.train.train`, with the round's hyperparameters, each
  from a fresh optimizer state as IMP's rounds start), and interpolates between them. Its files go into
  ``<experiment>/seed_S/round_RR/stability/``; a finished copy is not trained again and an interrupted one
  resumes from its checkpoint.
- :func:`dense_instability` does the same for the dense network at chosen iterations k of its training (the
  paper's "the dense network becomes stable early in training").
- :func:`write_stability_report` draws the error along the paths and the barrier against the weights remaining;
  :func:`write_dense_stability_report` the dense network's barrier against k.

On a CPU the trajectories are bit-for-bit reproducible for a given number of threads. A different
``torch.set_num_threads`` changes the order of float reductions, and training amplifies that into different
copies, so compare analyses made with the same thread count.

Masks: both ends of a path carry the same mask (the copies share it), so every point of the path does too; an
interpolation between states with different masks is refused. Batch norm: by default the running statistics
are interpolated like every other floating-point entry of the state; ``bn_reset_batches=N`` instead recomputes
them on N training batches at every point of the path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch
from torch import nn

from ._files import read_json
from .environment import environment
from .train import autocast, evaluate, save_atomic, subset_batches, train

_NOISE_BASE = 7_340_033


def noise_seeds_for(seed: int) -> tuple[int, int]:
    """The default noise seeds of the two copies of replicate ``seed`` (distinct from every replicate's data
    seed used by IMP itself)."""
    return (_NOISE_BASE + 2 * int(seed), _NOISE_BASE + 2 * int(seed) + 1)


# ------------------------------------------------------------------------------------------- interpolation
def interpolate_state(a: dict, b: dict, alpha: float) -> dict:
    """``(1 - alpha) * a + alpha * b`` entry by entry for floating-point tensors. Other entries (masks, batch
    norm's ``num_batches_tracked``) are taken from ``a``; masks (keys ending in ``weight_mask``) must be equal in
    both states."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the two states have different entries: {only[:5]}{' ...' if len(only) > 5 else ''}")
    alpha = float(alpha)
    out = {}
    for k, va in a.items():
        vb = b[k]
        if not isinstance(va, torch.Tensor):
            out[k] = va
            continue
        if va.shape != vb.shape:
            raise ValueError(f"{k}: shapes differ ({tuple(va.shape)} and {tuple(vb.shape)})")
        if k.endswith("weight_mask"):
            if not torch.equal(va.to(vb.device), vb):
                raise ValueError(f"{k}: the two states have different masks; a linear path between networks "
                                 "with different masks leaves both")
            out[k] = va.clone()
        elif va.is_floating_point():
            out[k] = torch.lerp(va, vb.to(device=va.device, dtype=va.dtype), alpha)
        else:
            out[k] = va.clone()
    return out


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reset_bn_statistics(model: nn.Module, train_data, batches: int, batch_size: int, seed: int = 0) -> None:
    """Recompute every batch norm's running mean and variance as the plain average over ``batches`` training
    batches (``train_data.batch(i, batch_size, seed)``, with its augmentation); other modules stay in eval
    mode."""
    bns = _bn_modules(model)
    if not bns or batches <= 0:
        return
    was_training = model.training
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the mean over the batches seen
        m.train()
    try:
        for i in range(batches):
            model(train_data.batch(i, batch_size, seed)[0])
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


def linear_path(model: nn.Module, state_a: dict, state_b: dict, test_data, *, points: int = 11,
                train_data=None, train_eval_size: int = 1000, eval_batch_size: int = 1000,
                bn_reset_batches: int = 0, bn_batch_size: int = 128, bn_seed: int = 0) -> list[dict]:
    """Evaluate ``model`` loaded with ``interpolate_state(state_a, state_b, alpha)`` at ``points`` evenly spaced
    ``alpha`` in [0, 1] (both ends included). Returns one row per point: ``alpha``, ``test_loss``,
    ``test_acc``, ``test_error`` and, with ``train_data``, the same on its first ``train_eval_size`` examples
    (``train_*``). The model's own weights are put back afterwards."""
    if int(points) < 2:
        raise ValueError(f"points must be >= 2 (the two ends), got {points}")
    if bn_reset_batches and train_data is None:
        raise ValueError("bn_reset_batches needs train_data")
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for i in range(int(points)):
            alpha = i / (int(points) - 1)
            model.load_state_dict(interpolate_state(state_a, state_b, alpha))
            # autocast keeps a cast copy of each leaf weight until its outermost context exits: weights loaded in
            # place under one context would be evaluated as the first point's (every bf16 barrier read 0)
            torch.clear_autocast_cache()
            if bn_reset_batches:
                reset_bn_statistics(model, train_data, bn_reset_batches, bn_batch_size, bn_seed)
            loss, acc = evaluate(model, test_data.eval_batches(eval_batch_size))
            row = dict(alpha=alpha, test_loss=loss, test_acc=acc, test_error=1.0 - acc)
            if train_data is not None and train_eval_size:
                loss, acc = evaluate(model, subset_batches(train_data, train_eval_size, eval_batch_size))
                row.update(train_loss=loss, train_acc=acc, train_error=1.0 - acc)
            rows.append(row)
    finally:
        model.load_state_dict(keep)
    return rows


def error_barrier(path: Sequence[dict], split: str = "test") -> float:
    """The paper's instability of a path: the largest error along it minus the mean error of its two ends
    (>= 0, since the ends are on the path)."""
    key = f"{split}_error"
    if len(path) < 2 or any(key not in r for r in path):
        raise ValueError(f"a path of at least two points with {key!r} is needed")
    errs = [float(r[key]) for r in sorted(path, key=lambda r: r["alpha"])]
    return max(errs) - 0.5 * (errs[0] + errs[-1])


# ------------------------------------------------------------------------------------------- on an IMP run
def stability_dir(exp, seed: int, r: int) -> str:
    return os.path.join(exp.round_dir(seed, r), "stability")


def _fork(exp, seed: int, out_dir: str, seeds: tuple[int, int], make_start, desc: str, progress, checkpoint_every,
          points: int, bn_reset_batches: int) -> tuple[list[dict], list[dict], dict]:
    """Train (or reload) the two copies ``make_start()`` gives (``(model, masks, start_iteration)``, the model
    at its starting weights) with the noise seeds, into ``out_dir``; return (linear path, copies, masks)."""
    train_data, test_data = exp.data  # first: a missing data folder is refused before the folder is made
    os.makedirs(out_dir, exist_ok=True)
    progress = exp.progress if progress is None else progress
    every = exp.checkpoint_every if checkpoint_every is None else int(checkpoint_every)
    finals, copies = [], []
    model = masks = None
    for copy, noise in enumerate(seeds):
        final_path = os.path.join(out_dir, f"copy_{noise}.pt")
        model, masks, start = make_start()
        if os.path.exists(final_path):
            state = torch.load(final_path, map_location=exp.device, weights_only=False)
            model.load_state_dict(state)
        else:
            cfg = dataclasses.replace(exp.train_cfg, seed=noise, progress=progress)
            ck = os.path.join(out_dir, f"checkpoint_{noise}.pt")
            train(model, train_data, test_data, cfg, start_iteration=start, checkpoint_path=ck,
                  checkpoint_every=every, desc=f"{desc} copy {copy} (noise {noise})")
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_atomic(state, final_path)
            if os.path.exists(ck):
                os.remove(ck)
        finals.append(state)
        with autocast(exp.train_cfg.precision, exp.device):  # evaluated as the run evaluates (bf16 runs in bf16)
            test_loss, test_acc = evaluate(model, test_data.eval_batches(exp.train_cfg.eval_batch_size))
        copies.append(dict(noise_seed=noise, test_acc=test_acc, test_loss=test_loss))
    with autocast(exp.train_cfg.precision, exp.device, cache_enabled=False):  # (weights change in place)
        path = linear_path(model, finals[0], finals[1], test_data, points=points, train_data=train_data,
                           train_eval_size=exp.train_cfg.train_eval_size or 1000,
                           eval_batch_size=exp.train_cfg.eval_batch_size, bn_reset_batches=bn_reset_batches,
                           bn_batch_size=exp.train_cfg.batch_size, bn_seed=seeds[0])
    return path, copies, masks


def _result(exp, seed: int, settings: dict, path: list[dict], copies: list[dict], **fields) -> dict:
    """The result of one fork (written to its stability.json): what ran, the path and its barriers."""
    return dict(experiment=os.path.basename(os.path.normpath(exp.dir)), seed=seed, control=exp.hp.control,
                model=exp.hp.model, iterations=exp.iterations, environment=environment(exp.device),
                precision=exp.train_cfg.precision, **fields,
                **settings, test_barrier=error_barrier(path, "test"), train_barrier=error_barrier(path, "train"),
                copies=copies, path=path)


def _noise_pair(seed: int, noise_seeds) -> tuple[int, int]:
    seeds = tuple(int(s) for s in (noise_seeds if noise_seeds is not None else noise_seeds_for(seed)))
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"noise_seeds must be two different seeds, got {noise_seeds}")
    return seeds


def _result_name(seed: int, seeds: tuple[int, int]) -> str:
    """``stability.json`` for the default noise seeds, ``stability_noise_A_B.json`` for others: each pair keeps
    its own result (the copies are kept per noise seed already)."""
    return "stability.json" if tuple(seeds) == noise_seeds_for(seed) else f"stability_noise_{seeds[0]}_{seeds[1]}.json"


def _find_result(out_dir: str, seed: int, seeds, settings: dict, precision: str = "fp32"
                 ) -> tuple[str, dict | None]:
    """(the result file of this pair of noise seeds, its finished result or None). A folder written before each
    pair had its own file holds a non-default pair in ``stability.json``: read back when its settings match."""
    path = os.path.join(out_dir, _result_name(seed, seeds))
    done = _cached(path, settings, precision)
    legacy = os.path.join(out_dir, "stability.json")
    if done is None and path != legacy:
        done = _cached(legacy, settings, precision)
    return path, done


def _legacy_pair(out_dir: str) -> tuple | None:
    """The noise seeds of ``out_dir``'s ``stability.json`` (None without one)."""
    legacy = os.path.join(out_dir, "stability.json")
    return tuple(read_json(legacy).get("noise_seeds") or ()) if os.path.exists(legacy) else None


def _write_result(result: dict, path: str) -> None:
    """Write a result to its file. An older version wrote every pair to ``stability.json``: one of another pair is
    first moved to that pair's own file (when it has none), one of the same pair is superseded."""
    from .imp import _write_json_atomic
    out_dir = os.path.dirname(path)
    legacy = os.path.join(out_dir, "stability.json")
    pair = _legacy_pair(out_dir)
    if pair is not None and pair != tuple(result["noise_seeds"]) and len(pair) == 2:
        own = os.path.join(out_dir, _result_name(result["seed"], pair))
        if own != legacy:
            if os.path.exists(own):
                os.remove(legacy)
            else:
                os.replace(legacy, own)
    _write_json_atomic(result, path)
    if path != legacy and _legacy_pair(out_dir) == tuple(result["noise_seeds"]):
        os.remove(legacy)


def _superseded(path: str) -> bool:
    """A ``stability.json`` that an older version wrote for a pair that now has its own file beside it."""
    if os.path.basename(path) != "stability.json":
        return False
    row = read_json(path)
    pair = tuple(row.get("noise_seeds") or ())
    own = _result_name(row["seed"], pair) if len(pair) == 2 else "stability.json"
    return own != "stability.json" and os.path.exists(os.path.join(os.path.dirname(path), own))


def _cached(result_path: str, settings: dict, precision: str = "fp32") -> dict | None:
    """The finished result at ``result_path`` when it was computed with ``settings`` in ``precision`` (a result
    that records none is fp32's: a bf16 result from before bf16 runs were evaluated in bf16, with every point of a
    stability path evaluated with its own weights, is computed again; the trained copies are kept), else None."""
    if os.path.exists(result_path):
        done = read_json(result_path)
        if {k: done.get(k) for k in settings} == settings and done.get("precision", "fp32") == precision:
            return done
    return None


def instability(exp, seed: int, r: int, *, noise_seeds: tuple[int, int] | None = None, points: int = 11,
                bn_reset_batches: int = 0, progress: bool | None = None, checkpoint_every: int | None = None
                ) -> dict:
    """Instability analysis of round ``r`` of replicate ``seed`` of the IMP experiment ``exp``
    (:class:`sparse_lth.imp.Experiment`): train two copies of the round from its rewind point with
    ``noise_seeds`` (default :func:`noise_seeds_for`), interpolate between their final weights and return
    (and write to ``stability.json``) ``dict(round, seed, rewind_iteration, start_iteration, noise_seeds,
    percent_remaining, path, test_barrier, train_barrier, copies=[final test/train accuracy per copy])``.

    Needs the experiment's ``init.pt`` and, for a rewind point after iteration 0 or for round 1 on, its
    ``rewind.pt`` (written during round 0) and the round's masks (or the previous round's final weights, from
    which they are computed as IMP would)."""
    from .imp import live_and_total
    seeds = _noise_pair(seed, noise_seeds)
    if not 0 <= r <= exp.n_rounds():
        raise ValueError(f"round {r} is not a round of this experiment (0 .. {exp.n_rounds()})")
    sdir = exp.seed_dir(seed)
    init_path = os.path.join(sdir, "init.pt")
    need = [init_path]
    if r > 0 or exp.rewind_iteration > 0:
        need.append(os.path.join(sdir, "rewind.pt"))
    missing = [p for p in need if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"the instability analysis of seed {seed} round {r} needs {missing}: run the IMP "
                                "experiment (at least through round 0) first")
    if r > 0 and not os.path.exists(os.path.join(exp.round_dir(seed, r), "masks.pt")) and \
            not os.path.exists(os.path.join(exp.round_dir(seed, r - 1), "final.pt")):
        raise FileNotFoundError(f"round {r} of seed {seed} has no masks yet and round {r - 1} has not finished: "
                                "run the IMP experiment through that round first")
    out_dir = stability_dir(exp, seed, r)
    settings = dict(noise_seeds=list(seeds), points=int(points), bn_reset_batches=int(bn_reset_batches))
    result_path, done = _find_result(out_dir, seed, seeds, settings, exp.train_cfg.precision)
    if done is not None:
        return done
    def start():  # the round's paths as it recorded them (a round still running: chosen as the run chooses)
        return exp.prepare_round(seed, r, from_rewind_point=True, recorded_paths=True)

    path, copies, masks = _fork(exp, seed, out_dir, seeds, start, f"seed {seed} round {r}", progress,
                                checkpoint_every, points, bn_reset_batches)
    live, total = live_and_total(masks)
    result = _result(exp, seed, settings, path, copies, round=r, rewind_iteration=exp.rewind_iteration,
                     start_iteration=exp.rewind_iteration, percent_remaining=100.0 * live / total)
    _write_result(result, result_path)
    return result


class _Reached(Exception):
    pass


def dense_stability_dir(exp, seed: int) -> str:
    return os.path.join(exp.seed_dir(seed), "dense_stability")


def dense_instability(exp, seed: int, iterations: Sequence[int], *, noise_seeds: tuple[int, int] | None = None,
                      points: int = 11, bn_reset_batches: int = 0, progress: bool | None = None,
                      checkpoint_every: int | None = None) -> list[dict]:
    """Instability of the dense network at each iteration k of ``iterations`` (the paper's "stable from
    iteration k on"): the dense network of replicate ``seed`` is trained from θ0 with the round's
    hyperparameters and the replicate's own data order up to k (the trajectory of IMP's round 0, bit for bit on
    CPU), then two copies go on from k with the noise seeds, each from a fresh optimizer state as IMP's rewound
    rounds do, and are interpolated. Returns one result per k (also written to
    ``seed_S/dense_stability/k_<k>/stability.json``); the weights at each k are kept beside them."""
    ks = sorted({int(k) for k in iterations})
    if not ks:
        raise ValueError("no iterations given")
    bad = [k for k in ks if not 0 <= k < exp.iterations]
    if bad:
        raise ValueError(f"iterations {bad} are not in [0, {exp.iterations}) (the training budget per round)")
    seeds = _noise_pair(seed, noise_seeds)
    if not os.path.exists(os.path.join(exp.seed_dir(seed), "init.pt")):
        raise FileNotFoundError(f"seed {seed} of {exp.dir} has no init.pt: run the IMP experiment (its round 0 "
                                "may still be running) first")
    base = dense_stability_dir(exp, seed)
    os.makedirs(base, exist_ok=True)
    settings = dict(noise_seeds=list(seeds), points=int(points), bn_reset_batches=int(bn_reset_batches))
    state_path = {k: os.path.join(base, f"state_{k}.pt") for k in ks if k > 0}
    todo = [k for k in ks if _find_result(os.path.join(base, f"k_{k:06d}"), seed, seeds, settings,
                                          exp.train_cfg.precision)[1] is None]
    missing = sorted(k for k in todo if k > 0 and not os.path.exists(state_path[k]))
    if missing:  # the dense trajectory up to the last missing k, saving the weights at each
        model, _, _ = exp.prepare_round(seed, 0)
        cfg = dataclasses.replace(exp.train_cfg, seed=seed, progress=exp.progress if progress is None else progress)
        train_data, test_data = exp.data

        def capture(it, m):
            if it in missing:
                save_atomic({k_: v.detach().clone() for k_, v in m.state_dict().items()}, state_path[it])
            if it >= missing[-1]:
                raise _Reached
        try:
            train(model, train_data, test_data, cfg, callback=capture,
                  desc=f"seed {seed} dense trajectory to iteration {missing[-1]}")
        except _Reached:
            pass

    def start_at(k):
        def make():
            model, masks, _ = exp.prepare_round(seed, 0)
            if k > 0:
                model.load_state_dict(torch.load(state_path[k], map_location=exp.device, weights_only=False))
            return model, masks, k
        return make

    out = []
    for k in ks:
        out_dir = os.path.join(base, f"k_{k:06d}")
        result_path, done = _find_result(out_dir, seed, seeds, settings, exp.train_cfg.precision)
        if done is not None:
            out.append(done)
            continue
        path, copies, _ = _fork(exp, seed, out_dir, seeds, start_at(k), f"seed {seed} dense at iteration {k}",
                                progress, checkpoint_every, points, bn_reset_batches)
        result = _result(exp, seed, settings, path, copies, kind="dense", iteration=k)
        _write_result(result, result_path)
        out.append(result)
    return out


# ---------------------------------------------------------------------------------------------------- report
def load_rows(exp_dir: str, *parts: str, key: str = "round", skip=None) -> list[dict]:
    """Every ``<exp_dir>/seed_*/<parts...>`` JSON file (glob patterns allowed) but those ``skip(path)`` names,
    ordered by seed and ``key``."""
    import glob
    rows = []
    for p in glob.glob(os.path.join(exp_dir, "seed_*", *parts)):
        if skip is not None and skip(p):
            continue
        row = read_json(p)
        row.setdefault("experiment", os.path.basename(os.path.normpath(exp_dir)))  # (files written before it)
        rows.append(row)
    return sorted(rows, key=lambda d: (d["seed"], d[key]))


def load_stability(exp_dir: str) -> list[dict]:
    """Every ``stability*.json`` of an experiment folder (one per round and noise-seed pair), ordered by seed and
    round."""
    return load_rows(exp_dir, "round_*", "stability", "stability*.json", skip=_superseded)


def _path_cells(d: dict) -> str:
    """The table cells of one path: test error at both ends, its largest, and the two barriers (percent)."""
    errs = [r["test_error"] for r in d["path"]]
    return (f"{100 * errs[0]:.2f} / {100 * errs[-1]:.2f} | {100 * max(errs):.2f} | {100 * d['test_barrier']:.2f} | "
            f"{100 * d['train_barrier']:.2f}")


def stability_markdown(results: Sequence[dict]) -> str:
    lines = ["| experiment | k | seed | round | % remaining | test error at a=0 / a=1 (%) | max test error on the "
             "path (%) | test barrier (pp) | train barrier (pp) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        noise = _noise_label(d, results)
        seed = f"{d['seed']} ({noise})" if noise else f"{d['seed']}"
        lines.append(f"| {experiment_cell(d, results)} | {d['rewind_iteration']} | {seed} | {d['round']} | "
                     f"{d['percent_remaining']:.2f} | {_path_cells(d)} |")
    return "\n".join(lines) + "\n"


def experiment_cell(d: dict, results: Sequence[dict]) -> str:
    """A table's "experiment" cell (beside its own column k): the control, the folder's name where another
    experiment of the same control and rewind iteration is in the table (layer-wise and global IMP, say), and the
    precision where the table holds more than one."""
    control = d.get("control", "imp")
    same = {r.get("experiment") for r in results
            if r.get("control", "imp") == control and r.get("rewind_iteration") == d.get("rewind_iteration")}
    cell = f"{control} ({d.get('experiment')})" if len(same) > 1 else control
    # results of several precisions side by side: each says its own (a result without one is fp32)
    if len({r.get("precision", "fp32") for r in results}) > 1:
        cell += f" [{d.get('precision', 'fp32')}]"
    return cell


def experiment_label(d: dict, results: Sequence[dict]) -> str:
    """What tells ``d``'s experiment from the others in ``results``: its control, its rewind iteration, or
    (when those agree) its folder's name; empty when it is the only experiment."""
    exps = {r.get("experiment") for r in results}
    if len(exps) <= 1:
        return ""
    parts = []
    if len({r.get("control", "imp") for r in results}) > 1:
        parts.append(d.get("control", "imp"))
    if len({r.get("rewind_iteration") for r in results}) > 1:
        parts.append(f"k={d.get('rewind_iteration')}")
    same = [r.get("experiment") for r in results if r.get("control", "imp") == d.get("control", "imp")
            and r.get("rewind_iteration") == d.get("rewind_iteration")]
    if len(set(same)) > 1 or not parts:
        parts.append(str(d.get("experiment")))
    return ", ".join(parts)


def _noise_key(d: dict) -> tuple:
    return tuple(d.get("noise_seeds") or ())


def _noise_label(d: dict, results: Sequence[dict]) -> str:
    """``noise seeds A,B`` where one replicate was analysed with more than one pair of noise seeds, else ""."""
    pairs = {_noise_key(r) for r in results if (r.get("experiment"), r["seed"]) == (d.get("experiment"), d["seed"])}
    return f"noise seeds {','.join(map(str, _noise_key(d)))}" if len(pairs) > 1 else ""


def _groups(results: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Results by (experiment, seed, noise seeds), labelled, each ordered by round (or by iteration: the dense
    analysis)."""
    key = lambda d: (d.get("experiment") or "", d["seed"], _noise_key(d))  # noqa: E731
    out = []
    for k in sorted({key(d) for d in results}):
        rows = sorted((d for d in results if key(d) == k), key=lambda d: d.get("round", d.get("iteration", 0)))
        label = ", ".join(x for x in (experiment_label(rows[0], results), f"seed {k[1]}",
                                      _noise_label(rows[0], results)) if x)
        out.append((label, rows))
    return out


def _barrier_lines(ax, results: Sequence[dict], x: str) -> None:
    """Test (solid) and train (dashed) barrier of each (experiment, seed) against the field ``x``."""
    for i, (label, rows) in enumerate(_groups(results)):
        xs = [d[x] for d in rows]
        ax.plot(xs, [100 * d["test_barrier"] for d in rows], "o-", color=f"C{i}", label=f"{label}: test error")
        ax.plot(xs, [100 * d["train_barrier"] for d in rows], "s--", color=f"C{i}", alpha=0.6,
                label=f"{label}: train error")


def write_stability_report(results: Sequence[dict], out_dir: str, title: str = "") -> dict:
    """``error_along_path.png`` (test error against alpha, one line per round), ``barrier_vs_remaining.png``
    (test and train barrier against the weights remaining) and ``stability.md`` into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from .report import _setup_axis, save_figure, save_markdown
    if not results:
        raise ValueError("no stability results to report")
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    ks = sorted({d["rewind_iteration"] for d in results})
    start = f"iteration {ks[0]}" if len(ks) == 1 else "each experiment's rewind point"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("viridis")
    groups = _groups(results)
    styles = ["-o", "--s", ":^", "-.v"]
    for g, (label, rows) in enumerate(groups):
        for i, d in enumerate(rows):
            xs = [r["alpha"] for r in d["path"]]
            ax.plot(xs, [100 * r["test_error"] for r in d["path"]], styles[g % len(styles)], ms=3,
                    color=cmap(i / max(len(rows) - 1, 1)),
                    label=f"{d['percent_remaining']:.1f}% (round {d['round']}, {label})")
    ax.set_xlabel("interpolation a between the two copies")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{title}: error along the linear path (copies from {start})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    files["paths"] = save_figure(fig, os.path.join(out_dir, "error_along_path.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _barrier_lines(ax, results, "percent_remaining")
    _setup_axis(ax, [d["percent_remaining"] for d in results])
    ax.set_ylabel("error barrier (percentage points)")
    ax.set_title(f"{title}: instability at {start}", fontsize=9)
    ax.legend(fontsize=8)
    files["barrier"] = save_figure(fig, os.path.join(out_dir, "barrier_vs_remaining.png"))

    files["summary"] = save_markdown(
        os.path.join(out_dir, "stability.md"), "Instability analysis", title,
        f"Two copies of each round trained from {start} (k) with different SGD noise; barrier = largest error along "
        "the linear path between them minus the mean of the two ends' errors, in percentage points.",
        stability_markdown(results))
    return files


# ------------------------------------------------------------------------------------- report: dense network
def load_dense_stability(exp_dir: str) -> list[dict]:
    """Every dense-network result (``seed_*/dense_stability/k_*/stability.json``), by seed and iteration."""
    return load_rows(exp_dir, "dense_stability", "k_*", "stability*.json", key="iteration", skip=_superseded)


def dense_stability_markdown(results: Sequence[dict]) -> str:
    lines = ["| experiment | seed | copies from iteration k | test error at a=0 / a=1 (%) | max test error on the "
             "path (%) | test barrier (pp) | train barrier (pp) |", "|---|---|---|---|---|---|---|"]
    for d in results:
        noise = _noise_label(d, results)
        lines.append(f"| {d['experiment']} | {d['seed']}{' (' + noise + ')' if noise else ''} | {d['iteration']} | "
                     f"{_path_cells(d)} |")
    return "\n".join(lines) + "\n"


def write_dense_stability_report(results: Sequence[dict], out_dir: str, title: str = "") -> dict:
    """``dense_barrier_vs_iteration.png`` (the dense network's test and train barrier against the iteration k
    the copies start from, symmetric-log axis) and ``dense_stability.md`` into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from .report import save_figure, save_markdown
    if not results:
        raise ValueError("no dense-network stability results to report")
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _barrier_lines(ax, results, "iteration")
    positive = [d["iteration"] for d in results if d["iteration"] > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
    ticks = sorted({d["iteration"] for d in results})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("iteration k the two copies start from")
    ax.set_ylabel("error barrier (percentage points)")
    ax.set_title(f"{title}: instability of the dense network" if title else "instability of the dense network",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    files = {"dense_barrier": save_figure(fig, os.path.join(out_dir, "dense_barrier_vs_iteration.png"))}
    files["dense_summary"] = save_markdown(
        os.path.join(out_dir, "dense_stability.md"), "Instability of the dense network", title,
        "The dense network trained to iteration k, then two copies trained on with different SGD noise; barrier as "
        "in stability.md.", dense_stability_markdown(results))
    return files

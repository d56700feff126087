"""What a winning ticket looks like: the "other observations" of Frankle & Carbin (ICLR 2019), read off an IMP
run's saved files with no training.

- **Initial weights** (:func:`init_weight_stats`): the values the survivors are reset to (θ0, or the rewind point
  with late rewinding), against all initial weights. The paper finds the ticket's initial weights bimodal,
  shifted away from zero. The summary is the survivors' mean |w| over the layer's, and the fraction of survivors
  within half a standard deviation of zero, against that fraction for all weights.
- **Connectivity** (:func:`connectivity_stats`): per layer and round, the fraction of each unit's incoming and of
  each input unit's outgoing weights that survive (for a conv layer an input channel's outgoing weights cover all
  its kernel taps). The paper finds units keep similar incoming but very different outgoing connectivity; the
  summary is the coefficient of variation (std / mean) of each.
- **Input pixels** (:func:`input_connectivity`): for a first layer that is a Linear reading the flattened image
  (LeNet-300-100), the fraction of each pixel's outgoing weights that survive, as an image: which parts of the
  input the ticket still reads (the pixels that no example ever lights, MNIST's border, lose theirs first).
- **Movement** (:func:`movement_stats`): how far each weight moved in the dense round's training, |θ_T - θ_k|,
  grouped by the round in which IMP pruned it (survivors of the last round apart). The paper finds that
  weights that survive move further than weights pruned early. Only for ``imp`` and ``oneshot`` experiments,
  whose masks come from their own trained weights.
- **Generalization gap** (:func:`generalization_gap`): train accuracy minus test accuracy at the early-stopping
  iteration, per round. The train accuracy is on the run's ``train_eval_size`` training examples (1,000 by
  default: a binomial standard error near 0.3-0.8 points). The paper finds the gap smaller for tickets. With
  ``evaluate=True`` (:func:`evaluated_gap`, the one measure here that runs the networks) each round's trained
  network is also evaluated on many training examples (all by default) and the whole test set: the gap at the
  end of training, measured without that noise.

:func:`anatomy` computes all of it for one replicate; :func:`write_anatomy_report` draws it for one or more
experiments.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Sequence

import torch

from ._files import read_json


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _cv(x: torch.Tensor) -> float | None:
    x = x.double()
    m = float(x.mean())
    return float(x.std(unbiased=False)) / m if m > 0 else None


# ---------------------------------------------------------------------------------------------------- measures
def init_weight_stats(start: torch.Tensor, mask: torch.Tensor, bins: int = 60) -> dict:
    """The survivors' starting values against all of the layer's: mean |w| ratio, the fraction within half a
    standard deviation of zero (survivors and all), and a histogram of both over the same bins."""
    w = start.double().reshape(-1)
    live = w[mask.reshape(-1).bool()]
    sd = float(w.std(unbiased=False)) or 1.0
    lo, hi = float(w.min()), float(w.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    out = dict(n=int(w.numel()), live=int(live.numel()), std=sd,
               mean_abs_ratio=(float(live.abs().mean()) / float(w.abs().mean())) if live.numel() and
               float(w.abs().mean()) > 0 else None,
               near_zero_live=float((live.abs() < 0.5 * sd).double().mean()) if live.numel() else None,
               near_zero_all=float((w.abs() < 0.5 * sd).double().mean()),
               edges=edges.tolist(),
               hist_all=torch.histc(w, bins, lo, hi).tolist(),
               hist_live=torch.histc(live, bins, lo, hi).tolist() if live.numel() else [0.0] * bins)
    return out


def connectivity_stats(mask: torch.Tensor) -> dict:
    """Surviving fraction of each output unit's incoming and each input unit's outgoing weights (rows and
    columns of a linear weight; output and input channels of a conv weight), with their coefficients of
    variation and the fraction of input units left with no outgoing weight."""
    m = mask.bool()
    incoming = m.reshape(m.shape[0], -1).double().mean(1)
    per_in = m.transpose(0, 1).reshape(m.shape[1], -1).double().mean(1)
    return dict(density=float(m.double().mean()), incoming_cv=_cv(incoming), outgoing_cv=_cv(per_in),
                incoming_min=float(incoming.min()), incoming_max=float(incoming.max()),
                outgoing_min=float(per_in.min()), outgoing_max=float(per_in.max()),
                inputs_disconnected=float((per_in == 0).double().mean()))


def _input_shape(hp: dict) -> tuple | None:
    """The (C, H, W) of the run's dataset: its ``dataset``, else the one its model was made for (as the IMP
    driver chooses it); None when unknown (a model of one's own given its data directly)."""
    from .data import INPUT_SHAPES
    from .imp import run_dataset
    try:
        return INPUT_SHAPES.get(run_dataset(hp.get("model"), hp.get("dataset") or ""))
    except ValueError:
        return None


def input_connectivity(mask: torch.Tensor, input_shape) -> list[list[float]] | None:
    """The fraction of each input pixel's outgoing weights that survive in a first Linear layer that reads the
    flattened ``input_shape`` (C, H, W) image, averaged over channels: an H x W grid (lists, 4 decimals). None
    for any other layer (a conv layer, or a Linear of another width)."""
    if input_shape is None or mask.dim() != 2 or mask.shape[1] != math.prod(input_shape):
        return None
    c, h, w = input_shape
    frac = mask.bool().double().mean(0).view(c, h, w).mean(0)
    return [[round(float(v), 4) for v in row] for row in frac]


def movement_stats(start: dict, trained: dict, masks_by_round: dict[int, dict], layers: Sequence[str]) -> dict:
    """Mean |θ_T - θ_k| of the dense round's training for the weights IMP pruned in each round, and for the
    survivors of the last round (key ``"survivors"``), pooled over ``layers`` and per layer."""
    rounds = sorted(masks_by_round)
    last = rounds[-1]
    pooled: dict = {}
    per_layer: dict = {}
    for n in layers:
        move = (trained[f"{n}.weight"].double() - start[f"{n}.weight"].double()).abs().reshape(-1)
        alive = torch.ones_like(move, dtype=torch.bool)
        groups = {}
        for r in rounds[1:]:
            mk = masks_by_round[r][n].reshape(-1).bool()
            pruned_now = alive & ~mk
            groups[r] = move[pruned_now]
            alive = alive & mk
        groups["survivors"] = move[alive]
        per_layer[n] = {str(k): (float(v.mean()) if v.numel() else None) for k, v in groups.items()}
        for k, v in groups.items():
            pooled.setdefault(k, []).append(v)
    pooled_mean = {}
    for k, vs in pooled.items():
        v = torch.cat(vs)
        pooled_mean[str(k)] = dict(mean=float(v.mean()) if v.numel() else None, count=int(v.numel()))
    return dict(last_round=last, pooled=pooled_mean, per_layer=per_layer)


def generalization_gap(metrics: dict) -> dict:
    """Train minus test accuracy at the early-stopping evaluation and at the end of training (None where the run
    measured no train accuracy)."""
    es = metrics["early_stop_iteration"]
    row = next((c for c in metrics["curve"] if c["iteration"] == es), None)
    at_es = None
    if row is not None and row.get("train_acc") is not None:
        at_es = row["train_acc"] - row["test_acc"]
    end = None if metrics.get("train_acc") is None else metrics["train_acc"] - metrics["test_acc"]
    return dict(at_early_stop=at_es, at_end=end)


def evaluated_gap(exp_dir: str, seed: int, rounds: Sequence[int], *, train_examples: int = 0,
                  device: str | torch.device = "cpu", data_root: str | None = None, progress: bool = False,
                  batch_size: int = 1000, data=None) -> dict[str, dict]:
    """``{round: dict(train_acc, test_acc, gap, train_examples, test_examples)}``: each finished round's trained
    network (its ``final.pt`` under its masks) evaluated here on the first ``train_examples`` training examples
    (0: all of them; no augmentation) and on the whole test set, as the run loaded them (its ``data_limit`` and
    ``test_limit`` apply; ``data``: (train, test) DeviceDatasets to use instead). ``gap`` is train minus test
    accuracy at the end of training."""
    from .imp import _load_weights, finished_rounds, open_experiment
    from .train import autocast, evaluate, subset_batches
    if isinstance(train_examples, bool) or not isinstance(train_examples, int) or train_examples < 0:
        raise ValueError(f"train_examples must be an integer >= 0 (0: all), got {train_examples!r}")
    exp = open_experiment(exp_dir, seed, device=device, data_root=data_root, progress=False, data=data)
    done = finished_rounds(exp.seed_dir(seed))
    bad = [r for r in rounds if r not in done]
    if bad:
        raise ValueError(f"rounds {bad} have not finished (finished: {sorted(done)})")
    train, test = exp.data
    n = len(train) if train_examples == 0 else min(train_examples, len(train))
    out = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rounds), desc=f"evaluating seed {seed}", unit="round", leave=False)
    try:
        for r in rounds:
            model, _, _ = exp.prepare_round(seed, r, recorded_paths=True)
            _load_weights(model, torch.load(os.path.join(done[r], "final.pt"), map_location=exp.device,
                                            weights_only=False))
            with torch.no_grad(), autocast(exp.train_cfg.precision, exp.device):  # as the run evaluated it
                _, train_acc = evaluate(model, subset_batches(train, n, batch_size))
                _, test_acc = evaluate(model, test.eval_batches(batch_size))
            out[str(r)] = dict(train_acc=train_acc, test_acc=test_acc, gap=train_acc - test_acc,
                               train_examples=n, test_examples=len(test))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _previous_evaluated(path: str, metrics: dict[int, dict]) -> dict[str, dict]:
    """The evaluated gaps in an earlier ``anatomy.json`` whose test accuracy is still the one the round's
    ``metrics.json`` records (evaluated on the whole test set, the two are equal to the last digit)."""
    if not os.path.exists(path):
        return {}
    try:
        old = read_json(path).get("generalization_gap") or {}
    except ValueError:  # damaged: it is about to be written again
        return {}
    out = {}
    for r, g in old.items():
        e = (g or {}).get("evaluated")
        m = metrics.get(int(r)) if r.isdigit() else None
        if e and m is not None and e.get("test_acc") == m.get("test_acc"):
            out[r] = e
    return out


# ---------------------------------------------------------------------------------------------------- one run
def anatomy(exp_dir: str, seed: int = 0, rounds: Sequence[int] | None = None, *, evaluate: bool = False,
            train_examples: int = 0, device: str | torch.device = "cpu", data_root: str | None = None,
            progress: bool = False, data=None) -> dict:
    """Every measure above for replicate ``seed`` of the experiment folder ``exp_dir`` (finished rounds only),
    written to ``seed_S/anatomy.json`` and returned. ``rounds``: the rounds whose initial-weight histograms are
    kept (default: round 0, the last and the one nearest the middle in weights remaining). ``evaluate``: also
    the gap at the end of training measured by :func:`evaluated_gap` (``train_examples``, ``device``,
    ``data_root``, ``progress``, ``data`` as there), under each round's ``generalization_gap`` as
    ``evaluated``. An earlier call's evaluated gaps are kept in the file, and reused by ``evaluate`` for the same
    ``train_examples`` (only rounds finished since then are run), as long as each still matches its round's
    recorded test accuracy."""
    hp = read_json(os.path.join(exp_dir, "hparams.json"))
    sdir = os.path.join(exp_dir, f"seed_{seed}")
    if not os.path.isdir(sdir):
        raise FileNotFoundError(f"{exp_dir} has no replicate {seed} (no {sdir})")
    from .imp import finished_rounds
    rdirs = finished_rounds(sdir)
    if not rdirs:
        raise FileNotFoundError(f"seed {seed} of {exp_dir} has no finished round: run the IMP experiment first")
    start_path = os.path.join(sdir, "rewind.pt")
    if not os.path.exists(start_path):
        start_path = os.path.join(sdir, "init.pt")
    start = _load(start_path)
    masks = {r: _load(os.path.join(d, "masks.pt"))["masks"] for r, d in rdirs.items()}
    metrics = {}
    for r, d in rdirs.items():
        metrics[r] = read_json(os.path.join(d, "metrics.json"))
    layers = list(masks[min(masks)])
    remaining = {r: m["percent_remaining"] for r, m in metrics.items()}
    if rounds is None:
        last = max(rdirs)
        mid = min(rdirs, key=lambda r: abs(math.log(max(remaining[r], 1e-9) / math.sqrt(100.0 * remaining[last]))))
        rounds = sorted({min(rdirs), mid, last})
    bad = [r for r in rounds if r not in rdirs]
    if bad:
        raise ValueError(f"rounds {bad} have not finished (finished: {list(rdirs)})")
    control = hp.get("control", "imp")
    # reinit resets to fresh weights, continue to the previous round's, noise to θk plus noise: their survivors
    # do not start at θk
    init = None if control in ("reinit", "continue", "noise") else {
        str(r): {n: init_weight_stats(start[f"{n}.weight"], masks[r][n]) for n in layers} for r in rounds}
    conn = {str(r): {n: connectivity_stats(masks[r][n]) for n in layers} for r in rdirs}
    shape = _input_shape(hp)
    grids = {str(r): input_connectivity(masks[r][layers[0]], shape) for r in rounds}
    pixels = None if any(g is None for g in grids.values()) else dict(layer=layers[0], rounds=grids)
    move = None
    if control in ("imp", "oneshot") and 0 in rdirs and len(rdirs) > 1 and \
            os.path.exists(os.path.join(rdirs[0], "final.pt")) and list(rdirs) == list(range(len(rdirs))):
        move = movement_stats(start, _load(os.path.join(rdirs[0], "final.pt")), masks, layers)
    gap = {str(r): generalization_gap(m) for r, m in metrics.items()}
    # the evaluated gap of an earlier call is kept (a call without ``evaluate`` does not lose it) and, with
    # ``evaluate``, reused for the same ``train_examples``: only rounds finished since are run. An entry counts
    # only while its test accuracy is still the round's recorded one (a round run again invalidates it).
    before = _previous_evaluated(os.path.join(sdir, "anatomy.json"), metrics)
    if evaluate:
        if isinstance(train_examples, bool) or not isinstance(train_examples, int) or train_examples < 0:
            raise ValueError(f"train_examples must be an integer >= 0 (0: all), got {train_examples!r}")
        keep = {r: v for r, v in before.items() if v.get("train_examples_asked") == train_examples}
        todo = [r for r in rdirs if str(r) not in keep]
        new = evaluated_gap(exp_dir, seed, todo, train_examples=train_examples, device=device,
                            data_root=data_root, progress=progress, data=data) if todo else {}
        before = {**keep, **{r: {**v, "train_examples_asked": train_examples} for r, v in new.items()}}
    for r, v in before.items():
        gap[r]["evaluated"] = v
    result = dict(experiment=os.path.basename(os.path.normpath(exp_dir)), control=control,
                  model=hp.get("model"), seed=seed, start=os.path.basename(start_path),
                  remaining={str(r): v for r, v in remaining.items()}, init_weights=init, connectivity=conn,
                  movement=move, generalization_gap=gap, input_connectivity=pixels)
    from .imp import _write_json_atomic
    _write_json_atomic(result, os.path.join(sdir, "anatomy.json"))
    return result


# ---------------------------------------------------------------------------------------------------- report
def load_anatomy(exp_dir: str) -> list[dict]:
    """Every ``seed_*/anatomy.json`` of an experiment folder, by seed."""
    from .stability import load_rows
    return load_rows(exp_dir, "anatomy.json", key="seed")


def _label(d: dict, results: Sequence[dict]) -> str:
    many = len({r["experiment"] for r in results}) > 1
    return f"{d['control'] + ', ' if many else ''}seed {d['seed']}"


def anatomy_markdown(results: Sequence[dict]) -> str:
    out = []
    for d in results:
        out.append(f"## {d['experiment']} (seed {d['seed']}, control {d['control']})\n")
        ev = {r: g["evaluated"] for r, g in d["generalization_gap"].items() if g.get("evaluated")}
        extra = " train / test acc at end (%) | gap at end (pp) |" if ev else ""
        out.append(f"| round | % remaining | gap at early stop (pp) |{extra} incoming CV | outgoing CV | "
                   f"inputs cut off |")
        out.append("|---|---|---|" + ("---|---|" if ev else "") + "---|---|---|")
        for r, pct in d["remaining"].items():
            c = d["connectivity"][r]
            g = d["generalization_gap"][r]["at_early_stop"]
            ins = statistics.fmean(v["incoming_cv"] or 0.0 for v in c.values())
            outs = statistics.fmean(v["outgoing_cv"] or 0.0 for v in c.values())
            cut = max(v["inputs_disconnected"] for v in c.values())
            cells = ""
            if ev:
                e = ev.get(r)
                cells = (f" {100 * e['train_acc']:.2f} / {100 * e['test_acc']:.2f} | {100 * e['gap']:.2f} |" if e
                         else " - | - |")
            out.append(f"| {r} | {pct:.2f} | {'-' if g is None else f'{100 * g:.2f}'} |{cells} {ins:.3f} | "
                       f"{outs:.3f} | {100 * cut:.1f}% |")
        out.append("\n(CV: coefficient of variation over units, the mean over layers; inputs cut off: the largest "
                   "fraction of any layer's input units left with no outgoing weight.)\n")
        if ev:
            e = next(iter(ev.values()))
            out.append(f"(At end: the trained network of each round evaluated on {e['train_examples']:,} training "
                       f"examples and {e['test_examples']:,} test examples; at early stop: the run's own "
                       f"evaluation, on its train_eval_size training examples.)\n")
        if d["init_weights"]:
            out.append("| round | layer | survivors' mean abs / layer's | within 0.5 std of zero: survivors / all |")
            out.append("|---|---|---|---|")
            for r, layers in d["init_weights"].items():
                for n, s in layers.items():
                    ratio = "-" if s["mean_abs_ratio"] is None else f"{s['mean_abs_ratio']:.3f}"
                    nz = "-" if s["near_zero_live"] is None else f"{100 * s['near_zero_live']:.1f}%"
                    out.append(f"| {r} | {n} | {ratio} | {nz} / {100 * s['near_zero_all']:.1f}% |")
            out.append("")
        pix = d.get("input_connectivity")
        if pix:
            out.append(f"| round | % remaining | input pixels {pix['layer']} still reads | pixels cut off | share of "
                       f"its live weights on the central quarter of the image |")
            out.append("|---|---|---|---|---|")
            for r, grid in pix["rounds"].items():
                t = torch.tensor(grid, dtype=torch.float64)
                h, w = t.shape
                centre = t[h // 4:h - h // 4, w // 4:w - w // 4].sum() / t.sum() if t.sum() > 0 else float("nan")
                out.append(f"| {r} | {d['remaining'][r]:.2f} | {int((t > 0).sum())} of {h * w} | "
                           f"{int((t == 0).sum())} | {100 * float(centre):.1f}% |")
            out.append("\n(The central quarter: the middle half of the rows and of the columns; 25% for a layer "
                       "with the same live fraction everywhere.)\n")
        if d["movement"]:
            out.append("| pruned in round | weights | mean abs(theta_T - theta_k) in the dense round |")
            out.append("|---|---|---|")
            for k, v in d["movement"]["pooled"].items():
                mean = "-" if v["mean"] is None else f"{v['mean']:.4f}"
                out.append(f"| {k} | {v['count']} | {mean} |")
            out.append("")
    return "\n".join(out) + "\n"


def write_anatomy_report(results: Sequence[dict], out_dir: str, title: str = "") -> dict:
    """``anatomy.png`` (generalization gap, connectivity CVs and movement by pruning round), ``init_weights.png``
    (histograms of the survivors' starting values per layer), ``input_pixels.png`` (where the first layer reads
    the flattened image) and ``anatomy.md`` into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .report import _setup_axis, save_figure, save_markdown
    if not results:
        raise ValueError("no anatomy results to report")
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    all_x = [v for d in results for v in d["remaining"].values()]
    experiments = list(dict.fromkeys(d["experiment"] for d in results))
    for d in results:  # one colour per experiment, its replicates told apart by their markers' fill
        label, color = _label(d, results), f"C{experiments.index(d['experiment']) % 10}"
        first = next(x for x in results if x["experiment"] == d["experiment"]) is d
        fill = {} if first else dict(markerfacecolor="white")
        rs = list(d["remaining"])
        xs = [d["remaining"][r] for r in rs]
        gaps = [d["generalization_gap"][r]["at_early_stop"] for r in rs]
        pts = [(x, 100 * g) for x, g in zip(xs, gaps) if g is not None]
        ev = [(d["remaining"][r], 100 * d["generalization_gap"][r]["evaluated"]["gap"]) for r in rs
              if d["generalization_gap"][r].get("evaluated")]
        if pts:  # with the evaluated gap, the noisy one at early stop is drawn thin
            axes[0].plot(*zip(*pts), "o-" if not ev else "o:", color=color, lw=1.5 if not ev else 0.8,
                         ms=6 if not ev else 3, label=f"{label}: at early stop", **fill)
        if ev:
            axes[0].plot(*zip(*ev), "s-", color=color, label=f"{label}: at end, evaluated", **fill)
        ins = [statistics.fmean(v["incoming_cv"] or 0.0 for v in d["connectivity"][r].values()) for r in rs]
        outs = [statistics.fmean(v["outgoing_cv"] or 0.0 for v in d["connectivity"][r].values()) for r in rs]
        axes[1].plot(xs, ins, "o-", color=color, label=f"{label}: incoming", **fill)
        axes[1].plot(xs, outs, "s--", color=color, label=f"{label}: outgoing", **fill)
        if d["movement"]:
            pooled = d["movement"]["pooled"]
            keys = [k for k in pooled if k != "survivors" and pooled[k]["mean"] is not None]
            axes[2].plot([int(k) for k in keys], [pooled[k]["mean"] for k in keys], "o-", color=color, label=label,
                         **fill)
            if pooled["survivors"]["mean"] is not None:
                axes[2].axhline(pooled["survivors"]["mean"], color=color, ls=":",
                                label=f"{label}: survivors of round {d['movement']['last_round']}")
    survivors = [d["movement"]["pooled"]["survivors"]["mean"] for d in results if d["movement"]]
    survivors = [v for v in survivors if v is not None]
    if survivors:  # the survivors' lines inside the axes, not on their edge
        low, high = axes[2].get_ylim()
        axes[2].set_ylim(min(low, min(survivors)), max(high, max(survivors) + 0.05 * (high - low)))
    for ax in axes[:2]:
        _setup_axis(ax, all_x)
    axes[0].set_ylabel("train - test accuracy (points)")
    axes[0].set_title(f"{title}: generalization gap" if title else "generalization gap", fontsize=9)
    axes[1].set_ylabel("coefficient of variation over units")
    axes[1].set_title("connectivity: incoming vs outgoing (mean over layers)", fontsize=9)
    axes[2].set_xlabel("round in which IMP pruned the weight")
    axes[2].set_ylabel("mean abs(theta_T - theta_k), dense round")
    axes[2].set_title("how far weights moved, by when they were pruned", fontsize=9)
    axes[2].grid(True, alpha=0.3)
    for ax in axes:
        n = len(ax.get_legend_handles_labels()[0])
        if n > 6:  # many lines: the legend under the axes, not over the data
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        elif n:
            ax.legend(fontsize=7)
    files["figure"] = save_figure(fig, os.path.join(out_dir, "anatomy.png"))

    with_init = [d for d in results if d["init_weights"]]
    if with_init:
        d = with_init[0]
        layers = list(next(iter(d["init_weights"].values())))
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
        for ax, n in zip(axes[0], layers):
            first = next(iter(d["init_weights"].values()))[n]
            edges = first["edges"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            width = edges[1] - edges[0]
            tot = sum(first["hist_all"]) or 1.0
            ax.plot(centers, [h / tot / width for h in first["hist_all"]], color="grey", lw=1.5,
                    label="all weights")
            for j, (r, layer_stats) in enumerate(d["init_weights"].items()):
                s = layer_stats[n]
                tl = sum(s["hist_live"])
                if r == "0" or not tl:
                    continue
                ax.plot(centers, [h / tl / width for h in s["hist_live"]], color=f"C{j}",
                        label=f"survivors, {d['remaining'][r]:.1f}% left")
            ax.set_title(n, fontsize=9)
            ax.set_xlabel(f"starting value ({d['start'].replace('.pt', '')})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("density")
        fig.suptitle(f"{title}: the ticket's starting weights ({_label(d, results)})", fontsize=10)
        files["init_weights"] = save_figure(fig, os.path.join(out_dir, "init_weights.png"))
    with_pixels = [d for d in results if d.get("input_connectivity")]
    if with_pixels:  # one row per experiment (its first replicate), one column per round kept, a colour bar each
        firsts = [d for d in with_pixels if next(x for x in with_pixels if x["experiment"] == d["experiment"]) is d]
        ncol = max(len(d["input_connectivity"]["rounds"]) for d in firsts)
        fig, axes = plt.subplots(len(firsts), ncol + 1, figsize=(2.7 * ncol + 0.9, 2.8 * len(firsts)), squeeze=False,
                                 gridspec_kw=dict(width_ratios=[1.0] * ncol + [0.07]))
        for row, d in zip(axes, firsts):
            grids = d["input_connectivity"]["rounds"]
            image = None
            for ax, (r, grid) in zip(row, grids.items()):
                t = torch.tensor(grid, dtype=torch.float64)
                rel = t / t.mean() if t.mean() > 0 else t  # 1: the layer's mean, 0: the pixel is cut off
                image = ax.imshow(rel.numpy(), cmap="RdBu_r", vmin=0.0, vmax=2.0)
                ax.set_title(f"{_label(d, results)}\nround {r}, {d['remaining'][r]:.1f}% left", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in row[len(grids):-1]:
                ax.axis("off")
            fig.colorbar(image, cax=row[-1]).set_label("live fraction / layer mean", fontsize=7)
        fig.suptitle(f"{title}: where the first layer reads the image" if title
                     else "where the first layer reads the image", fontsize=10)
        files["input_pixels"] = save_figure(fig, os.path.join(out_dir, "input_pixels.png"))
    files["summary"] = save_markdown(os.path.join(out_dir, "anatomy.md"), "Anatomy of the tickets", title, "",
                                     anatomy_markdown(results))
    return files

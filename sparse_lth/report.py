"""Figures (matplotlib, Agg) and a Markdown table from IMP run folders.

``write_report(experiment_dirs, out_dir)`` reads every experiment's ``hparams.json`` and
``seed_*/round_*/metrics.json`` and writes into ``out_dir``:

- ``accuracy_vs_remaining.png``: test accuracy at the early-stopping iteration and at the end of training vs the
  percent of weights remaining (log x axis, reversed: sparser to the right, as in the paper); one line per
  experiment (IMP, random reinit, random pruning, ...), the mean over replicates with a min/max band. With
  ``remaining="conv"`` (or ``"fc"``, ``"output"``, ``"fc,output"``) the x axis is the percent remaining of those
  layers' weights only: the arms of an ablation that prunes only some layers (conv only, fc only, both) set side
  by side at equal sparsity of the layers they share;
- ``early_stop_vs_remaining.png``: the early-stopping iteration (minimum validation loss with ``val_split``,
  else minimum test loss) vs weights remaining;
- ``gain_vs_remaining.png``: each round's test accuracy at early stop minus that of the same replicate's dense
  round 0 (experiments whose dense networks differ, side by side);
- ``curves.png``: test accuracy over training iterations for selected rounds (IMP solid, controls dashed);
- ``summary.md``: one table per experiment, a comparison table by round and the gains by round;
- ``rounds.csv``: every round of every replicate, one row each, for analyses of one's own;
- and the figures and tables of the analyses already run on these experiments (``sparse-lth stability``,
  ``landscape``, ``anatomy``), drawn again from their results.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics
import textwrap

from ._files import canonical_hparams, read_json
from .environment import describe as describe_environment, numerics_key

CONTROL_LABELS = {"imp": "IMP (winning ticket)", "reinit": "random reinit", "random_prune": "random pruning",
                  "oneshot": "one-shot", "continue": "continued training (no reset)",
                  "noise": "ticket + Gaussian noise"}
CONTROL_ORDER = ["imp", "reinit", "random_prune", "oneshot", "continue", "noise"]


def load_experiment(path: str, seeds=None) -> dict:
    """``dict(dir, name, hparams, rounds={round: [metrics per seed]}, seeds=[...])`` of one experiment; ``seeds``:
    those replicates only (default: all)."""
    hp_path = os.path.join(path, "hparams.json")
    if not os.path.isfile(hp_path):
        raise FileNotFoundError(f"{path} is not an experiment folder (no hparams.json)")
    hp = read_json(hp_path)
    rounds: dict[int, list[dict]] = {}
    found = set()
    for mp in sorted(glob.glob(os.path.join(path, "seed_*", "round_*", "metrics.json"))):
        m = read_json(mp)
        if seeds is not None and m["seed"] not in seeds:
            continue
        rounds.setdefault(int(m["round"]), []).append(m)
        found.add(m["seed"])
    return dict(dir=os.path.normpath(path), name=os.path.basename(os.path.normpath(path)), hparams=hp,
                rounds=dict(sorted(rounds.items())), seeds=sorted(found))


def find_experiments(paths) -> list[str]:
    """Experiment folders among ``paths``: each is an experiment folder or a run root holding some."""
    out = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "hparams.json")):
            out.append(os.path.normpath(p))
        elif os.path.isdir(p):
            found = sorted(os.path.dirname(h) for h in glob.glob(os.path.join(p, "*", "hparams.json")))
            if not found:
                raise FileNotFoundError(f"{p}: no experiment folders (with hparams.json) in it")
            out.extend(os.path.normpath(f) for f in found)
        else:
            raise FileNotFoundError(f"{p}: no such folder")
    return list(dict.fromkeys(out))


def related_experiments(exp_dir: str) -> list[str]:
    """``exp_dir`` and its sibling experiments that differ only in the control and its settings (the comparison
    to plot)."""
    from .imp import CONTROL_SETTINGS
    hp = read_json(os.path.join(exp_dir, "hparams.json"))

    def key(d):
        return {k: v for k, v in canonical_hparams(d).items() if k != "control" and k not in CONTROL_SETTINGS}

    out = [os.path.normpath(exp_dir)]
    for h in sorted(glob.glob(os.path.join(os.path.dirname(os.path.normpath(exp_dir)), "*", "hparams.json"))):
        d = os.path.normpath(os.path.dirname(h))
        if d in out:
            continue
        try:
            with open(h) as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        if key(other) == key(hp):
            out.append(d)
    return out


def _with_gains(exps: list[dict]) -> list[dict]:
    """``exps`` with each round's metrics given ``gain``: its test accuracy at early stop minus that of the same
    replicate's round 0 (the dense network it was pruned from; a control's is IMP's), None where round 0 is
    missing. New dicts: the loaded experiments are left as they were."""
    out = []
    for e in exps:
        dense = {m.get("seed"): m["early_stop_test_acc"] for m in e["rounds"].get(0, [])}
        rounds = {r: [dict(m, gain=None if m.get("seed") not in dense else
                           m["early_stop_test_acc"] - dense[m.get("seed")]) for m in ms]
                  for r, ms in e["rounds"].items()}
        out.append(dict(e, rounds=rounds))
    return out


def gain_markdown(exps: list[dict], kinds: tuple[str, ...] | None = None) -> str:
    """The table of :func:`_with_gains`: by round, each experiment's gain over its dense network in points, mean
    [min, max] over replicates (the pairing by seed takes the dense network's own spread out)."""
    part = "" if kinds is None else f" {' + '.join(kinds)}"
    gains = _with_gains(exps)
    lines = ["## Gain over the dense network (test accuracy at early stop minus the same replicate's round 0, "
             "points)\n", f"| round | %{part} remaining | " + " | ".join(_label(e, exps) for e in exps) + " |",
             "|---:|---:|" + "---:|" * len(exps)]
    for r in sorted({r for e in exps for r in e["rounds"]}):
        cells, pct = [], None
        for e in gains:
            ms = [m for m in e["rounds"].get(r, []) if m["gain"] is not None]
            if not ms:
                cells.append("-")
                continue
            own = statistics.fmean(_percent(e, m) for m in ms)
            pct = pct if pct is not None else own
            mean, lo, hi = _stats([m["gain"] for m in ms])
            cell = f"{100 * mean:+.2f}" + (f" [{100 * lo:+.2f}, {100 * hi:+.2f}]" if lo != hi else "")
            cells.append(cell + _own_percent(own, pct) + _of_seeds(len(ms), e))
        if pct is not None:
            lines.append(f"| {r} | {pct:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _own_percent(own: float, row: float) -> str:
    """A cell at another sparsity than its row's (one-shot's single round, another pruning rate) says its own."""
    return f" ({own:.2f} %)" if f"{own:.2f}" != f"{row:.2f}" else ""


def selection_markdown(exps: list[dict], kinds: tuple[str, ...] | None = None) -> str:
    """For the experiments that early-stop on a validation split (``val_split``): by round, the test accuracy at
    their early stop against the test accuracy at the minimum *test* loss of the same training, and the
    difference: what choosing the iteration on the test set itself would add (mean over replicates, points).
    Empty when no experiment has a validation split."""
    held = [e for e in exps if e["hparams"].get("val_split")]
    if not held:
        return ""
    from .train import early_stop
    part = "" if kinds is None else f" {' + '.join(kinds)}"
    lines = ["## Early stopping on the validation split vs on the test set\n",
             "Test accuracy at the early stop the validation loss chooses, and at the iteration of minimum test "
             "loss in the same training (what early stopping on the test set would report), mean over "
             "replicates (%); the difference in points.\n",
             f"| round | %{part} remaining | "
             + " | ".join(f"{_label(e, exps)}: val / test / diff" for e in held) + " |",
             "|---:|---:|" + "---:|" * len(held)]
    for r in sorted({r for e in held for r in e["rounds"]}):
        cells, pct = [], None
        for e in held:
            ms = [m for m in e["rounds"].get(r, []) if m.get("early_stop_on") == "val"]
            if not ms:
                cells.append("-")
                continue
            own = statistics.fmean(_percent(e, m) for m in ms)
            pct = pct if pct is not None else own
            v = statistics.fmean(m["early_stop_test_acc"] for m in ms)
            t = statistics.fmean(early_stop(m["curve"], on="test")[1] for m in ms)
            cells.append(f"{100 * v:.2f} / {100 * t:.2f} / {100 * (t - v):+.2f}" + _own_percent(own, pct)
                         + _of_seeds(len(ms), e))
        if pct is not None:
            lines.append(f"| {r} | {pct:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ROUND_COLUMNS = ("experiment", "control", "label", "seed", "round", "percent_remaining", "remaining",
                 "remaining_total", "early_stop_iteration", "early_stop_test_acc", "test_acc", "test_loss",
                 "train_acc", "train_loss", "gain", "wall_time", "time_per_step")


def write_rounds_csv(exps: list[dict], path: str) -> str:
    """Every round of every replicate as one CSV row (:data:`ROUND_COLUMNS`; accuracies as fractions, ``gain``
    as in :func:`_with_gains`, ``remaining`` the percent of the layers on the report's x axis), for analyses of
    one's own (``pandas.read_csv``)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROUND_COLUMNS)
        for e in _with_gains(exps):
            label = _label(e, exps)
            for r, ms in e["rounds"].items():
                for m in sorted(ms, key=lambda m: m.get("seed", 0)):
                    w.writerow([e["name"], e["hparams"].get("control", "imp"), label, m.get("seed"), r,
                                m["percent_remaining"], _percent(e, m), m.get("remaining_total"),
                                m["early_stop_iteration"], m["early_stop_test_acc"], m["test_acc"],
                                m.get("test_loss"), m.get("train_acc"), m.get("train_loss"), m["gain"],
                                m.get("wall_time"), m.get("time_per_step")])
    return path


def _stats(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, None
    return statistics.fmean(vals), min(vals), max(vals)


LAYER_KINDS = ("conv", "fc", "output")


def parse_remaining(spec) -> tuple[str, ...] | None:
    """The layer kinds of a report's x axis: None for "all" (every prunable weight), else a tuple of
    :data:`LAYER_KINDS` from a comma-separated string ("conv", "fc,output") or a sequence."""
    if spec is None or spec == "all":
        return None
    kinds = [k.strip() for k in spec.split(",")] if isinstance(spec, str) else [str(k) for k in spec]
    bad = [k for k in kinds if k not in LAYER_KINDS]
    if bad or not kinds:
        raise ValueError(f"remaining={spec!r}: give 'all', or layer kinds among {', '.join(LAYER_KINDS)}, "
                         "comma-separated (e.g. 'fc,output')")
    return tuple(dict.fromkeys(kinds))


def _layer_kinds(exp: dict) -> dict[str, str]:
    """``{layer: kind}`` of an experiment: as its rounds recorded it, or (runs from before they did) from its
    model, built again from ``hparams.json`` (no data needed)."""
    for ms in exp["rounds"].values():
        for m in ms:
            rem = m.get("remaining") or {}
            if rem and all(v.get("kind") for v in rem.values()):
                return {n: v["kind"] for n, v in rem.items()}
    from . import models
    from .data import INPUT_SHAPES
    from .imp import layer_kinds
    hp = exp["hparams"]
    name = hp.get("model", "lenet300_100")
    dataset = hp.get("dataset") or models.default_dataset(name)
    model = models.build_model(name, width=hp.get("width", 1.0), dropout=hp.get("dropout", 0.0), seed=0,
                               input_shape=INPUT_SHAPES.get(dataset))
    kinds = layer_kinds(model)
    recorded = {n for ms in exp["rounds"].values() for m in ms for n in m.get("remaining") or {}}
    if recorded and recorded != set(kinds):
        raise ValueError(f"{exp['name']}: its model, built again, has other layers ({', '.join(sorted(kinds))}) "
                         f"than its rounds recorded ({', '.join(sorted(recorded))}): the model's code changed "
                         "since it ran; report it with remaining='all'")
    return kinds


def _set_axis_kinds(exps: list[dict], kinds: tuple[str, ...] | None) -> None:
    """Make :func:`_percent` measure the layers of ``kinds`` (None: every prunable weight) in each experiment."""
    for e in exps:
        e["axis"] = None
        if kinds is None:
            continue
        layer_of = _layer_kinds(e)
        chosen = [n for n, k in layer_of.items() if k in kinds]
        if not chosen:
            raise ValueError(f"{e['name']} has no {' or '.join(kinds)} layers (its layers: "
                             + ", ".join(f"{n} {k}" for n, k in layer_of.items()) + ")")
        for r, ms in sorted(e["rounds"].items()):
            for m in ms:
                if any(n not in (m.get("remaining") or {}) for n in chosen):
                    raise ValueError(f"{e['name']}: round {r} of seed {m.get('seed')} records no count of the "
                                     f"weights remaining by layer (its metrics.json is older than those counts), "
                                     f"which the percent of {' + '.join(kinds)} weights is made of: report it "
                                     f"without --remaining")
        e["axis"] = chosen


def _percent(exp: dict, m: dict) -> float:
    """Percent of the weights remaining in one round's metrics ``m``: of all of them, or of the layers that
    :func:`_set_axis_kinds` chose."""
    layers = exp.get("axis")
    if not layers:
        return m["percent_remaining"]
    rem = m["remaining"]
    return 100.0 * sum(rem[n]["live"] for n in layers) / sum(rem[n]["total"] for n in layers)


def _axis_label(kinds: tuple[str, ...] | None) -> str:
    return "percent of weights remaining" if kinds is None else \
        f"percent of {' + '.join(kinds)} weights remaining"


def _series(exp: dict, field: str):
    """Rows (percent remaining, mean, min, max, n) per round with data."""
    rows = []
    for r, ms in exp["rounds"].items():
        mean, lo, hi = _stats([m[field] for m in ms])
        if mean is None:
            continue
        rows.append((statistics.fmean(_percent(exp, m) for m in ms), mean, lo, hi, len(ms), r))
    return rows


def _base_label(exp: dict) -> str:
    control = exp["hparams"].get("control", "imp")
    base = CONTROL_LABELS.get(control, control)
    if control == "oneshot" and exp["hparams"].get("oneshot_remaining"):
        base += f" ({100 * exp['hparams']['oneshot_remaining']:.1f}%)"
    if control == "oneshot" and exp["hparams"].get("oneshot_levels"):
        base += " at each level"
    if control == "noise":
        base += f" (σ = {exp['hparams'].get('noise_std', 0):g} x init std)"
    return base


def _label(exp: dict, all_exps: list[dict]) -> str:
    """The control's label; where several experiments share it, the hyperparameters in which they differ
    (``[prune_global=True]``), or the folder's name when they differ in none."""
    base = _base_label(exp)
    same = [e for e in all_exps if _base_label(e) == base]
    if len(same) > 1:
        differ = differing_hparams(exp["hparams"], [e["hparams"] for e in same], skip=("seed",))
        base += f" [{', '.join(differ) if differ else exp['name']}]"
    return base


def differing_hparams(mine: dict, peers: list[dict], skip=()) -> list[str]:
    """``key=value`` for each hyperparameter of ``mine`` (an ``hparams.json`` dict) whose value is not the same
    in all of ``peers`` (``mine`` among them), defaults filled in and step counts in one spelling, in the order of
    :class:`ImpHparams`' fields; keys in ``skip`` left out."""
    from .imp import ImpHparams, hparams_dict
    defaults = hparams_dict(ImpHparams())
    hps = [canonical_hparams({**defaults, **h}) for h in peers]
    full = canonical_hparams({**defaults, **mine})
    return [f"{k}={_format_value(full[k])}" for k in full
            if k not in skip and len({json.dumps(h.get(k)) for h in hps}) > 1]


def _format_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sorted(exps):
    """By control (IMP first), then noise level; experiments of one control keep the order they were given in
    (the first is drawn solid and in the control's colour)."""
    return sorted(exps, key=lambda e: (CONTROL_ORDER.index(e["hparams"].get("control", "imp"))
                                       if e["hparams"].get("control", "imp") in CONTROL_ORDER else 99,
                                       e["hparams"].get("noise_std", 0.0)))


def save_figure(fig, path: str) -> str:
    """Lay out, write (110 dpi, cropped to what is drawn, a legend below the axes included) and close a
    matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save_markdown(path: str, heading: str, title: str, intro: str, body: str) -> str:
    """Write an analysis's Markdown summary: ``# heading: title``, the ``intro`` paragraph (if any), the table
    ``body``; returns ``path``."""
    paragraphs = [f"# {heading}{': ' + title if title else ''}"] + ([intro] if intro else [])
    with open(path, "w") as f:
        f.write("\n\n".join(paragraphs) + "\n\n" + body)
    return path


def _setup_axis(ax, xs, label: str = "percent of weights remaining"):
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [100, 51.3, 21.1, 7.0, 3.6, 1.9, 0.7, 0.3]  # the paper's levels
    lo, hi = min(xs), max(xs)
    t = [v for v in ticks if lo * 0.8 <= v <= hi * 1.25]
    if len(t) < 3:  # a narrow range (say, one layer kind's weights, 100 to 28%): round numbers, spaced out
        t = []
        for v in (100, 80, 60, 50, 40, 30, 20, 15, 10, 7, 5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1):
            if lo * 0.9 <= v <= hi * 1.1 and (not t or t[-1] / v >= 1.18):
                t.append(v)
        t = t or [lo, hi]
    ax.set_xticks(t)
    ax.set_xticklabels([f"{v:g}" for v in t])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def _legend(fig, axes, fontsize: int = 8) -> None:
    """A legend in each of ``axes`` (their lines are the same experiments), or, when labels are long (the
    hyperparameters that tell experiments of one control apart), one legend below the figure, where it hides
    no data."""
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        return
    if max(len(t) for t in labels) <= 40:
        for ax in axes:
            ax.legend(fontsize=fontsize)
    else:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=fontsize,
                   frameon=False)


# colours of a second, third, ... experiment of one control (another sigma, other hyperparameters)
_MORE_COLORS = ("black", "tab:cyan", "tab:olive", "tab:pink", "tab:gray", "navy")


def _plot_series(ax, exps, field: str, styles: dict, scale: float = 1.0) -> None:
    """One line per experiment: the mean of ``field`` over replicates against weights remaining, with a
    min-max band when there is more than one replicate; a round that not every replicate has finished gets an
    open marker (its mean is over fewer seeds), explained once in the legend."""
    seen: dict[str, int] = {}
    explained = False
    for e in exps:
        rows = _series(e, field)
        if not rows:
            continue
        control = e["hparams"].get("control", "imp")
        st = dict(styles.get(control, {}))
        k = seen[control] = seen.get(control, -1) + 1
        if k:  # another experiment of the same control (noise at another sigma, other hyperparameters): its
            # colour also depends on the control, so that two controls' second experiments differ
            st["linestyle"] = ["--", ":", "-."][(k - 1) % 3]
            c = list(styles).index(control) if control in styles else 0
            st["color"] = _MORE_COLORS[(k - 1 + c) % len(_MORE_COLORS)]
        x = [r[0] for r in rows]
        ax.plot(x, [scale * r[1] for r in rows], label=_label(e, exps), ms=4, **st)
        if max(r[4] for r in rows) > 1:
            ax.fill_between(x, [scale * r[2] for r in rows], [scale * r[3] for r in rows], alpha=0.2,
                            color=st.get("color"))
        partial = [r for r in rows if r[4] < len(e["seeds"])]
        if partial:
            ax.plot([r[0] for r in partial], [scale * r[1] for r in partial], linestyle="none",
                    marker=st.get("marker", "o"), ms=6, mfc="white", mec=st.get("color", "black"),
                    label=None if explained else "open: not every replicate yet")
            explained = True


def _layer_series(exp: dict) -> tuple[list[float], dict[str, list[float]], dict[str, str]]:
    """(percent of all weights remaining per round, {layer: percent of its weights remaining per round},
    {layer: kind}), means over the replicates that have each round."""
    xs, ys, kinds = [], {}, {}
    for r, ms in exp["rounds"].items():
        per = [m.get("remaining") or {} for m in ms]
        if not per[0]:
            continue
        xs.append(statistics.fmean(m["percent_remaining"] for m in ms))
        for name, d in per[0].items():
            kinds[name] = d.get("kind") or ""
            ys.setdefault(name, []).append(statistics.fmean(100.0 * p[name]["live"] / p[name]["total"]
                                                            for p in per if name in p))
    return xs, ys, kinds


def layers_figure(exps: list[dict], title: str):
    """One panel per distinct layer-wise schedule among ``exps`` (experiments with the same masks' sparsities,
    a ticket and its reinit control say, share one): each layer's percent of weights remaining against the
    percent of all weights remaining. Shows what global pruning or per-kind rates do to each layer. None when no
    round records its layers."""
    import matplotlib.pyplot as plt
    panels: list[tuple[tuple, list[str], tuple]] = []  # (key, labels, series)
    for e in exps:
        xs, ys, kinds = _layer_series(e)
        if len(xs) < 2:
            continue
        key = (tuple(round(x, 2) for x in xs),
               tuple((n, tuple(round(v, 2) for v in vs)) for n, vs in ys.items()))
        for k, labels, _ in panels:
            if k == key:
                labels.append(_label(e, exps))
                break
        else:
            panels.append((key, [_label(e, exps)], (xs, ys, kinds)))
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (_, labels, (xs, ys, kinds)) in zip(axes.flat, panels):
        cmap = plt.get_cmap("tab10" if len(ys) <= 10 else "tab20")
        for i, (name, vs) in enumerate(ys.items()):
            style = {"conv": "-", "fc": "--", "output": ":"}.get(kinds.get(name), "-.")
            ax.plot(xs, vs, style, marker="o", ms=3, lw=1.2, color=cmap(i % cmap.N),
                    label=f"{name} ({kinds.get(name)})" if kinds.get(name) else name)
        ax.plot(xs, xs, color="gray", lw=0.8, alpha=0.6, label="all weights")
        _setup_axis(ax, xs)
        ax.set_yscale("log")
        ax.set_ylabel("percent of the layer's weights remaining")
        ax.grid(True, alpha=0.3, which="both")
        ax.set_title(textwrap.fill(", ".join(labels), 60), fontsize=9)
        ax.legend(fontsize=6, ncol=2 if len(ys) > 8 else 1)
    fig.suptitle(f"{title}: weights remaining by layer")
    return fig


def write_report(experiment_dirs, out_dir: str, *, title: str | None = None, curve_rounds=None,
                 remaining="all", seeds=None) -> dict:
    """Write the figures and ``summary.md`` for ``experiment_dirs`` into ``out_dir``; returns their paths.
    ``remaining``: the x axis, percent of all weights remaining ("all"), or of the layers of some kinds only
    ("conv", "fc", "output", or several, comma-separated). ``seeds``: only these replicates, in every table and
    figure (the analyses' too), to set experiments side by side on the seeds they share."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kinds = parse_remaining(remaining)
    if seeds is not None:
        seeds = sorted({int(s) for s in seeds})
        if not seeds:
            raise ValueError("seeds: give at least one replicate")
    exps = _sorted([load_experiment(d, seeds) for d in find_experiments(list(experiment_dirs))])
    exps = [e for e in exps if e["rounds"]]
    if not exps:
        raise ValueError("no finished rounds to report (no metrics.json) in " + ", ".join(map(str, experiment_dirs))
                         + ("" if seeds is None else f" for seeds {','.join(map(str, seeds))}"))
    _set_axis_kinds(exps, kinds)
    xlabel = _axis_label(kinds)
    os.makedirs(out_dir, exist_ok=True)
    title = title or exps[0]["hparams"].get("model", "")
    files = {}
    styles = {"imp": dict(color="tab:blue", marker="o"), "reinit": dict(color="tab:orange", marker="s"),
              "random_prune": dict(color="tab:green", marker="^"), "oneshot": dict(color="tab:red", marker="D"),
              "continue": dict(color="tab:purple", marker="v"), "noise": dict(color="tab:brown", marker="P")}
    all_x = [row[0] for e in exps for row in _series(e, "test_acc")]

    # --- accuracy vs weights remaining
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, field, name in ((axes[0], "early_stop_test_acc", "test accuracy at early stop"),
                            (axes[1], "test_acc", "test accuracy at end of training")):
        _plot_series(ax, exps, field, styles, scale=100)
        _setup_axis(ax, all_x, xlabel)
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)  # (once: two panel titles of "title: name" ran into each other)
    _legend(fig, axes)
    files["accuracy"] = save_figure(fig, os.path.join(out_dir, "accuracy_vs_remaining.png"))

    # --- early-stopping iteration vs weights remaining
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _plot_series(ax, exps, "early_stop_iteration", styles)
    _setup_axis(ax, all_x, xlabel)
    on = sorted({"validation" if e["hparams"].get("val_split") else "test" for e in exps}, reverse=True)
    ax.set_ylabel(f"early-stopping iteration (min {' or '.join(on)} loss)")
    ax.set_title(textwrap.fill(f"{title}: early-stopping iteration", 75), fontsize=10)
    _legend(fig, [ax])
    files["early_stop"] = save_figure(fig, os.path.join(out_dir, "early_stop_vs_remaining.png"))

    # --- the gain over the dense network, replicate by replicate (experiments whose dense networks differ)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axhline(0.0, color="gray", lw=0.8)
    _plot_series(ax, _with_gains(exps), "gain", styles, scale=100)
    _setup_axis(ax, all_x, xlabel)
    ax.set_ylabel("gain at early stop over the dense network (points)")
    ax.set_title(textwrap.fill(f"{title}: gain over the dense network (same seed)", 75), fontsize=10)
    _legend(fig, [ax])
    files["gain"] = save_figure(fig, os.path.join(out_dir, "gain_vs_remaining.png"))

    # --- each layer's weights remaining against all weights remaining
    fig = layers_figure(exps, title)
    if fig is not None:
        files["layers"] = save_figure(fig, os.path.join(out_dir, "layers_vs_remaining.png"))

    # --- test accuracy over training for selected rounds
    ref = exps[0]
    targets = curve_rounds
    if targets is None:  # rounds closest to the paper's levels 100, 51, 21, 7, 3.6 percent
        avail = {r: statistics.fmean(m["percent_remaining"] for m in ms) for r, ms in ref["rounds"].items()}
        targets = []
        for level in (100, 51.3, 21.1, 7.0, 3.6):
            r = min(avail, key=lambda k: abs(math.log(avail[k] / level)))
            if r not in targets and abs(math.log(avail[r] / level)) < 0.35:
                targets.append(r)
    # one replicate for every experiment (the reference's lowest seed, by number): a ticket and its control drawn
    # from different seeds (each one's first) differed by the seeds' spread, even in the shared dense round 0
    seed = min((m.get("seed", 0) for ms in ref["rounds"].values() for m in ms), default=0)

    def of_seed(ms):
        return [m for m in ms if m.get("seed", 0) == seed][:1]

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("viridis")
    dashed = []  # the experiments drawn besides the first, for the title
    for i, r in enumerate(targets):
        color = cmap(i / max(len(targets) - 1, 1))
        for e in exps:
            ms = e["rounds"].get(r)
            if not ms:
                continue
            control = e["hparams"].get("control", "imp")
            if control not in ("imp", "reinit") and e is not ref or not of_seed(ms):
                continue
            m = of_seed(ms)[0]
            its = [c["iteration"] for c in m["curve"]]
            accs = [100 * c["test_acc"] for c in m["curve"]]
            ls = "-" if e is ref else "--"
            if e is not ref and _label(e, exps) not in dashed:
                dashed.append(_label(e, exps))
            ax.plot(its, accs, ls, color=color, lw=1.2,
                    label=f"{m['percent_remaining']:.1f}% {'' if e is ref else _label(e, exps)}".strip())
    ax.set_xlabel("training iteration")
    ax.set_ylabel("test accuracy (%)")
    lo = [100 * c["test_acc"] for e in exps for r in targets for m in of_seed(e["rounds"].get(r, []))
          for c in m["curve"] if c["iteration"] > 0]
    if lo:
        ax.set_ylim(max(min(lo) - 0.5, 0), min(max(lo) + 0.3, 100))
    ax.grid(True, alpha=0.3)
    which = f"solid: {_label(ref, exps)}; dashed: {', '.join(dashed)}" if dashed else _label(ref, exps)
    ax.set_title(textwrap.fill(f"{title}: test accuracy during training, seed {seed} ({which})", 110), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    files["curves"] = save_figure(fig, os.path.join(out_dir, "curves.png"))

    files["summary"] = os.path.join(out_dir, "summary.md")
    with open(files["summary"], "w") as f:
        f.write(summary_markdown(exps, kinds) + "\n" + gain_markdown(exps, kinds))
        sel = selection_markdown(exps, kinds)
        if sel:
            f.write("\n" + sel)
    files["rounds"] = write_rounds_csv(exps, os.path.join(out_dir, "rounds.csv"))
    files.update(_analyses(exps, out_dir, title, seeds))
    return files


def _analyses(exps: list[dict], out_dir: str, title: str, seeds=None) -> dict:
    """The figures and tables of the analyses already run on these experiments (``sparse-lth stability``,
    ``landscape``, ``anatomy``): nothing is computed here, finished results are only drawn again."""
    from . import anatomy, landscape, stability
    dirs = [e["dir"] for e in exps]
    files = {}
    for name, load, write in (("stability", stability.load_stability, stability.write_stability_report),
                              ("dense_stability", stability.load_dense_stability,
                               stability.write_dense_stability_report),
                              ("landscape", landscape.load_landscape, landscape.write_landscape_report)):
        results = [d for x in dirs for d in load(x) if seeds is None or d["seed"] in seeds]
        if results:  # each writer names its files "summary", "figure"...: keyed by analysis, none hides another
            files.update({f"analysis_{name}_{k}": v for k, v in write(results, out_dir, title=title).items()})
    done = [d for x in dirs for d in anatomy.load_anatomy(x) if seeds is None or d["seed"] in seeds]
    if done:
        files.update({f"analysis_anatomy_{k}": v
                      for k, v in anatomy.write_anatomy_report(done, out_dir, title=title).items()})
    return files


def _fmt_acc(mean, lo, hi, n):
    if mean is None:
        return "-"
    if n > 1:
        return f"{100 * mean:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
    return f"{100 * mean:.2f}"


def _of_seeds(n: int, e: dict) -> str:
    """" (n of N seeds)" for a round that only ``n`` of an experiment's ``N`` replicates have finished, else ""."""
    return f" ({n} of {len(e['seeds'])} seeds)" if n < len(e["seeds"]) else ""


def _fmt_paths(ms: list) -> str:
    """The layers' paths of one round's replicates, grouped by path: "all dense", or "dense: conv1, conv2;
    sparse: fc1" (a layer whose replicates differ appears under each of its paths)."""
    by_path: dict = {}
    for m in ms:
        for layer, path in m.get("paths", {}).items():
            by_path.setdefault(path, set()).add(layer)
    if len(by_path) == 1:
        return f"all {next(iter(by_path))}"
    return "; ".join(f"{p}: {', '.join(sorted(layers))}" for p, layers in sorted(by_path.items()))


def _fmt_iteration(vals: list) -> str:
    """Early-stop iterations over replicates: the mean, and [min, max] where they differ."""
    mean, lo, hi = _stats(vals)
    return f"{mean:.0f}" + (f" [{lo}, {hi}]" if lo != hi else "")


def _ran_on(e: dict) -> str:
    """Where an experiment's rounds ran (:func:`sparse_lth.environment.describe`), each distinct machine and code
    once, with how many rounds ran there when there are several; "" for runs from before this was recorded."""
    counts: dict[str, int] = {}
    for ms in e["rounds"].values():
        for m in ms:
            for text in dict.fromkeys(describe_environment(env) for env in m.get("environments") or []):
                counts[text] = counts.get(text, 0) + 1
    if len(counts) <= 1:
        return "".join(counts)
    return "; ".join(f"{env} ({n} round{'s' if n != 1 else ''})" for env, n in counts.items())


def _describe(hp: dict) -> str:
    """One line of an experiment's settings: model and data, optimizer, budget, pruning, rewind, layers (the
    optional ones only where set)."""
    opt = f"{hp.get('optimizer')} lr {hp.get('lr')}"
    for key, name in (("momentum", "momentum"), ("weight_decay", "weight decay"), ("warmup", "warmup")):
        if hp.get(key):
            opt += f", {name} {hp[key]}"
    if hp.get("nesterov"):
        opt += " (Nesterov)"
    if hp.get("precision", "fp32") != "fp32":
        opt += f", {hp['precision']} autocast"
    if hp.get("milestones"):
        opt += f", lr x{hp.get('gamma')} at {','.join(map(str, hp['milestones']))}"
    model = f"model {hp.get('model')}" + (f" on {hp['dataset']}" if hp.get("dataset") else "")
    for key, default in (("width", 1.0), ("dropout", 0.0)):
        if hp.get(key, default) != default:
            model += f", {key} {hp[key]}"
    return (f"{model}, {opt}, batch {hp.get('batch_size')}, {hp.get('iterations')} per round, prune fc "
            f"{hp.get('prune_fc')} / conv {hp.get('prune_conv')} / output {hp.get('prune_output')} per round "
            f"({'global' if hp.get('prune_global') else 'layer-wise'}), rewind {hp.get('rewind')}, "
            f"layers {hp.get('layer_impl')}, early stop on "
            + (f"the loss of {hp['val_split']:,} held-out training examples" if hp.get("val_split") else
               "the test loss"))


def summary_markdown(exps: list[dict], kinds: tuple[str, ...] | None = None) -> str:
    """One table per experiment and, for several, a comparison by round. ``kinds``: the layer kinds whose percent
    remaining the comparison's rows give (and a column of each table), as :func:`write_report`'s ``remaining``
    (call :func:`_set_axis_kinds` first)."""
    lines = []
    part = "" if kinds is None else f" {' + '.join(kinds)}"
    for e in exps:
        hp = e["hparams"]
        lines.append(f"## {_label(e, exps)}: `{e['name']}`\n")
        ran_on = _ran_on(e)
        partial = any(len(ms) < len(e["seeds"]) for ms in e["rounds"].values())
        lines.append(f"{_describe(hp)}; replicates: {len(e['seeds'])} (seeds {e['seeds']}). "
                     f"Accuracies in %, mean [min, max] over replicates"
                     + (" (a round that not every replicate has finished says how many have)" if partial else "")
                     + "." + (f" Ran on: {ran_on}." if ran_on else "") + "\n")
        lines.append("| round | % weights remaining | " + (f"%{part} remaining | " if part else "")
                     + "early-stop iteration | test acc at early stop | "
                     "test acc at end | train acc at end | wall time / round (s) | ms / step | paths |")
        lines.append("|---:|---:|" + ("---:|" if part else "") + "---:|---:|---:|---:|---:|---:|---|")
        for r, ms in e["rounds"].items():
            n = len(ms)
            pct = statistics.fmean(m["percent_remaining"] for m in ms)
            if part:
                pct = f"{pct:.2f} | {statistics.fmean(_percent(e, m) for m in ms):.2f}"
            else:
                pct = f"{pct:.2f}"
            es = _fmt_iteration([m["early_stop_iteration"] for m in ms])
            lines.append(
                f"| {r}{_of_seeds(n, e)} | {pct} | {es} | "
                f"{_fmt_acc(*_stats([m['early_stop_test_acc'] for m in ms]), n)} | "
                f"{_fmt_acc(*_stats([m['test_acc'] for m in ms]), n)} | "
                f"{_fmt_acc(*_stats([m.get('train_acc') for m in ms]), n)} | "
                f"{statistics.fmean(m['wall_time'] for m in ms):.0f} | "
                f"{1000 * statistics.fmean(m['time_per_step'] for m in ms):.2f} | {_fmt_paths(ms)} |")
        lines.append("")
    if len(exps) > 1:
        lines.append("## Comparison by round (test accuracy at early stop, %; mean early-stop iteration)\n")
        numerics = {json.dumps(numerics_key(env), sort_keys=True) for e in exps for ms in e["rounds"].values()
                    for m in ms for env in m.get("environments") or []}
        if len(numerics) > 1:
            lines.append("These rounds did not all run under the same numerics (torch version, device, CPU "
                         "instruction set or threads: see each experiment's \"Ran on\"), so equal settings need "
                         "not give equal digits.\n")
        head = f"| round | %{part} remaining | " + " | ".join(_label(e, exps) for e in exps) + " |"
        lines.append(head)
        lines.append("|---:|---:|" + "---:|" * len(exps))
        rounds = sorted({r for e in exps for r in e["rounds"]})
        for r in rounds:
            cells = []
            pct = None
            for e in exps:
                ms = e["rounds"].get(r)
                if not ms:
                    cells.append("-")
                    continue
                own = statistics.fmean(_percent(e, m) for m in ms)
                pct = pct if pct is not None else own
                mean, lo, hi = _stats([m["early_stop_test_acc"] for m in ms])
                es = statistics.fmean(m["early_stop_iteration"] for m in ms)
                cells.append(f"{_fmt_acc(mean, lo, hi, len(ms))} @ {es:.0f}{_own_percent(own, pct)}"
                             f"{_of_seeds(len(ms), e)}")
            lines.append(f"| {r} | {pct:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

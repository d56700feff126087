"""Do two runs find the same ticket? The overlap of their masks, round by round.

Two IMP variants (another pruning criterion, one-shot against iterative pruning, another validation protocol, a
later rewind point, another seed) end with masks of the same sizes; how many live weights they share says whether
they found the same subnetwork or merely one as good. For each round both experiments have finished, and each
prunable layer (and all layers together):

- ``shared``: weights live in both masks; ``jaccard`` = shared / live in either;
- ``of_a`` / ``of_b``: the fraction of each mask's live weights that the other keeps too;
- ``chance``: the shared count two independent random masks of the same per-layer sizes would have on average
  (live_a * live_b / total per layer), and ``enrichment`` = shared / chance (1: no more alike than random masks;
  the largest possible is total / max(live_a, live_b)).

:func:`mask_overlap` compares two mask dicts, :func:`overlap` two experiment folders; ``sparse-lth overlap``
prints the table and draws ``overlap.png``. Reads saved files only.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from ._files import read_json


def mask_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per layer, and ``"all"`` over the layers both have: ``live_a, live_b, shared, total, jaccard, of_a, of_b,
    chance, enrichment`` (see the module docstring). Layers of other shapes are refused."""
    common = [n for n in a if n in b]
    if not common:
        raise ValueError(f"the masks share no layer (one has {sorted(a)[:5]}, the other {sorted(b)[:5]})")
    out = {}
    tot = dict(live_a=0, live_b=0, shared=0, total=0, chance=0.0)
    for n in common:
        ma, mb = a[n].bool(), b[n].bool()
        if ma.shape != mb.shape:
            raise ValueError(f"layer {n}: masks of shapes {tuple(ma.shape)} and {tuple(mb.shape)}")
        row = dict(live_a=int(ma.sum()), live_b=int(mb.sum()), shared=int((ma & mb).sum()), total=ma.numel())
        row["chance"] = row["live_a"] * row["live_b"] / row["total"]
        for k in tot:
            tot[k] += row[k]
        out[n] = _ratios(row)
    out["all"] = _ratios(tot)
    return out


def _ratios(row: dict) -> dict:
    either = row["live_a"] + row["live_b"] - row["shared"]
    return dict(row, jaccard=row["shared"] / either if either else 1.0,
                of_a=row["shared"] / row["live_a"] if row["live_a"] else 1.0,
                of_b=row["shared"] / row["live_b"] if row["live_b"] else 1.0,
                enrichment=row["shared"] / row["chance"] if row["chance"] else float("nan"))


def _round_masks(exp_dir: str, seed: int) -> dict[int, str]:
    from .imp import finished_rounds
    sdir = os.path.join(exp_dir, f"seed_{seed}")
    if not os.path.isdir(sdir):
        raise FileNotFoundError(f"{exp_dir} has no replicate {seed} (no {sdir})")
    return {r: d for r, d in finished_rounds(sdir).items() if os.path.exists(os.path.join(d, "masks.pt"))}


def overlap(exp_a: str, exp_b: str, seed_a: int = 0, seed_b: int | None = None,
            rounds: Sequence[int] | None = None, match: str = "round") -> dict:
    """The overlap of replicate ``seed_a`` of experiment folder ``exp_a`` with replicate ``seed_b`` (default: the
    same seed) of ``exp_b``: ``dict(a, b (their names), dir_a, dir_b, seed_a, seed_b, match,
    rounds=[dict(round, round_b, percent_a, percent_b, layers={layer or "all": mask_overlap row})])``.
    ``match="round"``: round r of A with round r of B, at every round both have finished (or ``rounds``, A's).
    ``match="remaining"``: each round of A with B's round nearest to it in weights remaining, where they are within
    10% of each other (other schedules: 60% per round against 20%, a one-shot run's single round)."""
    if match not in ("round", "remaining"):
        raise ValueError(f"match must be 'round' or 'remaining', got {match!r}")
    seed_b = seed_a if seed_b is None else seed_b
    da, db = _round_masks(exp_a, seed_a), _round_masks(exp_b, seed_b)
    for d, e, s in ((da, exp_a, seed_a), (db, exp_b, seed_b)):
        if not d:
            raise ValueError(f"{e} (seed {s}) has no finished round yet")
    pct_a = {r: read_json(os.path.join(d, "metrics.json"))["percent_remaining"] for r, d in da.items()}
    pct_b = {r: read_json(os.path.join(d, "metrics.json"))["percent_remaining"] for r, d in db.items()}
    if match == "round":
        pairs = {r: r for r in da if r in db}
    else:
        pairs = {}
        for r, p in pct_a.items():
            rb = min(pct_b, key=lambda k: abs(math.log(pct_b[k] / p)), default=None)
            if rb is not None and abs(math.log(pct_b[rb] / p)) <= math.log(1.1):
                pairs[r] = rb
    if rounds is not None:
        bad = [r for r in rounds if r not in pairs]
        if bad:
            raise ValueError(f"rounds {bad} of A have no {'finished round' if match == 'round' else 'round as sparse'}"
                             f" in B (those that do: {sorted(pairs)})")
        pairs = {r: pairs[r] for r in rounds}
    if not pairs:
        raise ValueError(f"{exp_a} (seed {seed_a}) and {exp_b} (seed {seed_b}) have no finished round in common"
                         + (" (rounds of other schedules pair by weights remaining: --match remaining)"
                            if match == "round" else " within 10% in weights remaining"))
    rows = []
    for r, rb in sorted(pairs.items()):
        ma = torch.load(os.path.join(da[r], "masks.pt"), map_location="cpu", weights_only=False)["masks"]
        mb = torch.load(os.path.join(db[rb], "masks.pt"), map_location="cpu", weights_only=False)["masks"]
        rows.append(dict(round=r, round_b=rb, percent_a=pct_a[r], percent_b=pct_b[rb], layers=mask_overlap(ma, mb)))
    return dict(a=os.path.basename(os.path.normpath(exp_a)), b=os.path.basename(os.path.normpath(exp_b)),
                dir_a=exp_a, dir_b=exp_b, seed_a=seed_a, seed_b=seed_b, match=match, rounds=rows)


def overlap_markdown(results: Sequence[dict]) -> str:
    """One table per comparison: by round, the weights remaining of each, and over all layers the Jaccard
    index, the fractions of each mask the other keeps, and the enrichment over random masks; then the last
    round's per-layer rows."""
    lines = []
    for d in results:
        lines.append(f"## `{d['a']}` (seed {d['seed_a']}) against `{d['b']}` (seed {d['seed_b']})"
                     + (f": {d['label']}" if d.get("label") else "") + "\n")
        lines.append("| round | % left A | % left B | shared / either (Jaccard) | of A's live, kept by B | "
                     "of B's live, kept by A | shared / chance |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for row in d["rounds"]:
            o = row["layers"]["all"]
            r = _round_name(row)
            lines.append(f"| {r} | {row['percent_a']:.2f} | {row['percent_b']:.2f} | {o['jaccard']:.3f} | "
                         f"{o['of_a']:.3f} | {o['of_b']:.3f} | {o['enrichment']:.2f} |")
        last = d["rounds"][-1]
        lines.append(f"\nRound {_round_name(last)}, by layer:\n")
        lines.append("| layer | live A | live B | shared | Jaccard | shared / chance |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for n, o in last["layers"].items():
            lines.append(f"| {n} | {o['live_a']:,} | {o['live_b']:,} | {o['shared']:,} | {o['jaccard']:.3f} | "
                         f"{o['enrichment']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _round_name(row: dict) -> str:
    """"r", or "r / r_b" where B's round is another."""
    rb = row.get("round_b", row["round"])
    return str(row["round"]) if rb == row["round"] else f"{row['round']} / {rb}"


def label_results(results: Sequence[dict]) -> None:
    """Give each result a ``label``: B's name as the report names experiments (its control and the
    hyperparameters that tell it apart from the others compared), with the seeds compared."""
    from .report import _label, load_experiment
    dirs = list(dict.fromkeys(os.path.normpath(d[k]) for d in results for k in ("dir_a", "dir_b")))
    exps = {d: load_experiment(d) for d in dirs}
    for d in results:
        a, b = os.path.normpath(d["dir_a"]), os.path.normpath(d["dir_b"])
        name = _label(exps[b], list(exps.values())) if b != a else "itself"
        seeds = f"seed {d['seed_a']}" if d["seed_a"] == d["seed_b"] else f"seed {d['seed_a']} vs {d['seed_b']}"
        d["label"] = f"{name}, {seeds}"


def write_overlap_report(results: Sequence[dict], out_dir: str, title: str = "") -> dict:
    """``overlap.md`` and ``overlap.png`` (the fraction of A's live weights that B keeps too, and the enrichment
    over random masks, against the weights remaining of A; one line per comparison) in ``out_dir``; returns
    their paths."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .report import _setup_axis, save_figure
    os.makedirs(out_dir, exist_ok=True)
    files = {"summary": os.path.join(out_dir, "overlap.md")}
    with open(files["summary"], "w") as f:
        f.write((f"# Mask overlap: {title}\n\n" if title else "# Mask overlap\n\n") + overlap_markdown(results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    xs_all = []
    cmap = plt.get_cmap("tab10")
    colours = {b: cmap(i % 10) for i, b in enumerate(dict.fromkeys(d["dir_b"] for d in results))}
    nth: dict[str, int] = {}
    for d in results:  # one colour per experiment B, a line style per replicate pair
        xs = [row["percent_a"] for row in d["rounds"]]
        xs_all += xs
        k = nth[d["dir_b"]] = nth.get(d["dir_b"], -1) + 1
        st = dict(color=colours[d["dir_b"]], linestyle=["-", "--", ":", "-."][k % 4], marker="o", ms=3)
        axes[0].plot(xs, [100 * row["layers"]["all"]["of_a"] for row in d["rounds"]],
                     label=d.get("label") or f"{d['b']}, seed {d['seed_b']}", **st)
        axes[1].plot(xs, [row["layers"]["all"]["enrichment"] for row in d["rounds"]], **st)
    for ax, name in ((axes[0], "% of A's live weights that B keeps too"),
                     (axes[1], "shared live weights / shared by random masks")):
        _setup_axis(ax, xs_all, "percent of weights remaining (A)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_ylim(0, 102)
    a = results[0]["a"]
    fig.suptitle(f"{title}: A = {a}" if title else f"mask overlap with A = {a}", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
               frameon=False, ncol=2)
    files["figure"] = save_figure(fig, os.path.join(out_dir, "overlap.png"))
    return files

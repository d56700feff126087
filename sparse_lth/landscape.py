"""The loss landscape of IMP's solutions (Saleem, Ahuja, Prasad & Lall, "Insights into the Lottery Ticket
Hypothesis and Iterative Magnitude Pruning"): the top eigenvalues of the loss Hessian at each level's minimum
(smaller: a wider basin), the distance between consecutive levels' solutions, and the loss of one level's
solution projected onto the next level's mask (the network right after pruning, before retraining).

- :func:`hessian_vector_product` and :func:`top_hessian_eigenvalues` work on any model: the Hessian is that of
  the mean cross-entropy over the batches given, with respect to the trainable parameters, restricted to the
  live weights. A layer on the sparse path trains its live values only, so its Hessian is already the
  restricted one; a dense-path layer's weight (and a plain layer with a ``weight_mask`` buffer) is projected
  onto its mask on both sides, so a pruned coordinate never enters. The model is evaluated in eval mode (batch
  norm with its running statistics, no dropout).
- :func:`landscape` computes the three measures for a finished round of an IMP experiment and writes
  ``<experiment>/seed_S/round_RR/landscape.json``; :func:`write_landscape_report` draws them against the
  weights remaining.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .environment import environment
from .train import autocast, evaluate, subset_batches


def masked_parameters(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(parameter, mask or None)`` for every trainable parameter of ``model``: the mask a dense-path sparse
    layer attached to its weight (``weight._sparse_lth_mask``), a plain layer's ``weight_mask`` buffer, or None."""
    plain = {}
    for m in model.modules():
        if not hasattr(m, "set_mask") and isinstance(getattr(m, "weight_mask", None), torch.Tensor) and \
                isinstance(getattr(m, "weight", None), torch.Tensor):
            plain[id(m.weight)] = m.weight_mask
    out = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mask = getattr(p, "_sparse_lth_mask", None)
        if mask is None:
            mask = plain.get(id(p))
        if mask is not None and mask.shape != p.shape:
            raise ValueError(f"a mask of shape {tuple(mask.shape)} on a parameter of shape {tuple(p.shape)}")
        out.append((p, None if mask is None else mask.to(device=p.device, dtype=p.dtype)))
    return out


def _project(vs, masks):
    return [v if m is None else v * m for v, m in zip(vs, masks)]


def _dot(a, b) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def hessian_vector_product(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vector,
                           params=None) -> list[torch.Tensor]:
    """``H v`` for the Hessian of the mean cross-entropy over ``batches`` (a list of ``(x, y)``; all of them make
    one loss) with respect to ``params`` (default :func:`masked_parameters`), projected onto the masks."""
    params = masked_parameters(model) if params is None else params
    ps, masks = [p for p, _ in params], [m for _, m in params]
    v = _project([t.to(p.dtype) for t, p in zip(vector, ps)], masks)
    total = sum(int(y.numel()) for _, y in batches)
    if total == 0:
        raise ValueError("the Hessian needs at least one example")
    was_training = model.training
    model.eval()
    out = [torch.zeros_like(p) for p in ps]
    try:
        for x, y in batches:
            logits = model(x)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss = F.cross_entropy(logits, y, reduction="sum") / total
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, v) if g is not None]
            if not pairs:
                continue
            dot = sum((g * t).sum() for g, t in pairs)
            hv = torch.autograd.grad(dot, ps, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach())
    finally:
        model.train(was_training)
    return _project(out, masks)


def top_hessian_eigenvalues(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int = 1,
                            iters: int = 60, tol: float = 1e-3, seed: int = 0, progress: bool = False,
                            desc: str = "Lanczos") -> dict:
    """The ``k`` largest (algebraic) eigenvalues of the masked loss Hessian over ``batches``, by the Lanczos
    method with full reorthogonalization: at most ``iters`` Hessian-vector products, fewer once every one of the
    ``k`` Ritz values has a residual bound ``|beta_j s_j|`` below ``tol`` times its size. Keeps ``iters`` vectors
    of the live parameters' size. Returns ``dict(eigenvalues=[largest first], residuals, iterations,
    converged, parameters=number of live coordinates)``."""
    if k < 1 or iters < 1:
        raise ValueError(f"k and iters must be >= 1, got k={k}, iters={iters}")
    params = masked_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter")
    masks = [m for _, m in params]
    n_live = sum(int(p.numel() if m is None else m.count_nonzero()) for p, m in params)
    if k > n_live:
        raise ValueError(f"k={k} eigenvalues asked of a Hessian over {n_live} live coordinates")
    steps = min(int(iters), n_live)
    if steps < k:
        raise ValueError(f"iters={iters} Lanczos steps cannot give k={k} eigenvalues")
    g = torch.Generator().manual_seed(seed)
    q = _project([torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p, _ in params], masks)
    norm = math.sqrt(float(_dot(q, q)))
    q = [t / norm for t in q]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=False)
    try:
        return _lanczos(model, batches, params, masks, q, steps, k, tol, n_live, bar)
    finally:
        if bar is not None:
            bar.close()


def _lanczos(model, batches, params, masks, q, steps, k, tol, n_live, bar) -> dict:
    basis, alphas, betas = [], [], []
    theta = resid = None
    converged = False
    for j in range(steps):
        basis.append(q)
        w = hessian_vector_product(model, batches, q, params)
        alphas.append(float(_dot(w, q)))
        for _ in range(2):  # full reorthogonalization, twice: keeps the Ritz values free of ghost copies
            for b in basis:
                c = _dot(b, w)
                w = [x - c.to(x.dtype) * y for x, y in zip(w, b)]
        beta = math.sqrt(float(_dot(w, w)))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        top = min(k, len(alphas))
        theta = evals.flip(0)[:top]
        resid = (beta * evecs[-1].flip(0)[:top]).abs()
        scale = max(float(evals.abs().max()), 1e-30)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(top=f"{float(theta[0]):.4g}", residual=f"{float(resid.max()):.2g}")
        if len(alphas) >= k and bool((resid <= tol * torch.clamp(theta.abs(), min=1e-12 * scale)).all()):
            converged = True
            break
        if beta <= 1e-12 * scale:  # an invariant subspace: the Ritz values are exact
            converged = len(alphas) >= k
            break
        betas.append(beta)
        q = [x / beta for x in w]
    return dict(eigenvalues=[float(v) for v in theta], residuals=[float(r) for r in resid], iterations=len(alphas),
                converged=converged, parameters=n_live)


# ------------------------------------------------------------------------------------------- on an IMP run
def _load(path: str, device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def landscape(exp, seed: int, r: int, *, top: int = 1, examples: int = 1000, iters: int = 60, tol: float = 1e-3,
              batch_size: int = 500) -> dict:
    """Landscape measures of the solution of round ``r`` of replicate ``seed`` of ``exp``
    (:class:`sparse_lth.imp.Experiment`), written to ``round_RR/landscape.json`` and returned:

    - ``eigenvalues``: the ``top`` largest Hessian eigenvalues at the round's final weights, over the first
      ``examples`` training examples (without augmentation);
    - ``distance_to_next``: the L2 distance between this round's and the next round's final prunable weights
      (when the next round has finished), and ``distance_to_next_relative`` (divided by this round's norm);
    - ``projected``: the final weights of this round with the next round's mask applied (what magnitude pruning
      leaves before rewinding): train loss/accuracy on the same examples and test loss/accuracy, next to
      ``final`` for the unpruned solution (when there is a next round).

    A round whose next round's mask is not pruned from its solution gets neither of the last two (None): the
    controls ``reinit``, ``random_prune`` and ``noise``, and ``oneshot`` at each level after round 0 (every
    level prunes the dense network).
    """
    if not 0 <= tol < 1:  # a relative residual: at 1 or more (inf) every Ritz value "converges" at once
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    rdir = exp.round_dir(seed, r)
    final_path = os.path.join(rdir, "final.pt")
    if not os.path.exists(final_path):
        raise FileNotFoundError(f"round {r} of seed {seed} has not finished ({final_path} is missing): run the IMP "
                                "experiment through it first")
    settings = dict(top=int(top), examples=int(examples), iters=int(iters), tol=float(tol))
    out_path = os.path.join(rdir, "landscape.json")
    nxt = r + 1 if r < exp.n_rounds() else None
    chained = nxt is not None and exp.pruned_from(nxt) == r
    next_final = None if nxt is None else os.path.join(exp.round_dir(seed, nxt), "final.pt")
    from .stability import _cached
    precision = exp.train_cfg.precision
    done = _cached(out_path, settings, precision)
    if done is not None and (not chained or not os.path.exists(next_final)
                             or done.get("distance_to_next") is not None):
        return done  # (a next round that finished since then adds its distance)
    train_data, test_data = exp.data
    batches = list(subset_batches(train_data, examples, batch_size))
    final = _load(final_path, exp.device)
    model, masks, _ = exp.prepare_round(seed, r, recorded_paths=True)
    model.load_state_dict(final)
    hess = top_hessian_eigenvalues(model, batches, k=top, iters=iters, tol=tol, seed=seed, progress=exp.progress,
                                   desc=f"seed {seed} round {r} Hessian")
    # the losses as the run evaluated them (a bf16 run under bf16 autocast; the cast cache off: weights are loaded
    # in place); the Hessian in fp32 (its products are second-order: bf16 would drown them)
    with autocast(precision, exp.device, cache_enabled=False):
        own = dict(train=evaluate(model, batches), test=evaluate(model, test_data.eval_batches(1000)))
    live = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    result = dict(experiment=os.path.basename(os.path.normpath(exp.dir)), round=r, seed=seed, model=exp.hp.model,
                  environment=environment(exp.device), precision=precision, hessian_precision="fp32",
                  control=exp.hp.control, rewind_iteration=exp.rewind_iteration,
                  percent_remaining=100.0 * live / total, **settings, eigenvalues=hess["eigenvalues"],
                  hessian_iterations=hess["iterations"], hessian_converged=hess["converged"],
                  live_parameters=hess["parameters"],
                  final=dict(train_loss=own["train"][0], train_acc=own["train"][1], test_loss=own["test"][0],
                             test_acc=own["test"][1]),
                  distance_to_next=None, distance_to_next_relative=None, projected=None)
    if chained:
        # the next round's mask (computed as IMP does)
        pmodel, pmasks, _ = exp.prepare_round(seed, nxt, recorded_paths=True)
        state = dict(final)
        for n, mk in pmasks.items():
            mk = mk.to(exp.device)
            state[f"{n}.weight"] = final[f"{n}.weight"] * mk
            state[f"{n}.weight_mask"] = mk
        pmodel.load_state_dict(state)
        with autocast(precision, exp.device, cache_enabled=False):
            tr_loss, tr_acc = evaluate(pmodel, batches)
            te_loss, te_acc = evaluate(pmodel, test_data.eval_batches(1000))
        result["projected"] = dict(train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc,
                                   percent_remaining=100.0 * sum(int(m.sum()) for m in pmasks.values()) / total)
        if os.path.exists(next_final):
            other = _load(next_final, exp.device)
            d2 = sum(float(((final[f"{n}.weight"] - other[f"{n}.weight"]).double() ** 2).sum()) for n in masks)
            n2 = sum(float((final[f"{n}.weight"].double() ** 2).sum()) for n in masks)
            result["distance_to_next"] = math.sqrt(d2)
            result["distance_to_next_relative"] = math.sqrt(d2 / n2) if n2 > 0 else None
    from .imp import _write_json_atomic
    _write_json_atomic(result, out_path)
    return result


# ---------------------------------------------------------------------------------------------------- report
def load_landscape(exp_dir: str) -> list[dict]:
    """Every ``landscape.json`` of an experiment folder, ordered by seed and round."""
    from .stability import load_rows
    return load_rows(exp_dir, "round_*", "landscape.json")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def landscape_markdown(results: Sequence[dict]) -> str:
    from .stability import experiment_cell
    lines = ["| experiment | k | seed | round | % remaining | top Hessian eigenvalues | train loss | distance to next "
             "(relative) | after pruning to the next mask: train loss / test acc (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        eig = ", ".join(f"{e:.4g}" for e in d["eigenvalues"])
        p = d["projected"]
        proj = "-" if p is None else f"{p['train_loss']:.4f} / {100 * p['test_acc']:.2f}"
        lines.append(f"| {experiment_cell(d, results)} | {d.get('rewind_iteration', '-')} | {d['seed']} | "
                     f"{d['round']} | "
                     f"{d['percent_remaining']:.2f} | {eig} | "
                     f"{d['final']['train_loss']:.4f} | {_fmt(d['distance_to_next'], '.3f')} "
                     f"({_fmt(d['distance_to_next_relative'], '.3f')}) | {proj} |")
    return "\n".join(lines) + "\n"


def write_landscape_report(results: Sequence[dict], out_dir: str, title: str = "") -> dict:
    """``landscape.png`` (top eigenvalue, distance to the next level, and the train loss before and after
    pruning, against the weights remaining) and ``landscape.md`` into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    if not results:
        raise ValueError("no landscape results to report")
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    from .stability import _groups
    for label, rows in _groups(results):
        xs = [d["percent_remaining"] for d in rows]
        axes[0].plot(xs, [d["eigenvalues"][0] for d in rows], "o-", label=label)
        dist = [(d["percent_remaining"], d["distance_to_next_relative"]) for d in rows
                if d["distance_to_next_relative"] is not None]
        if dist:
            axes[1].plot(*zip(*dist), "o-", label=label)
        proj = [(d["percent_remaining"], d["final"]["train_loss"], d["projected"]["train_loss"]) for d in rows
                if d["projected"] is not None]
        if proj:
            px, before, after = zip(*proj)
            axes[2].plot(px, before, "o-", label=f"{label}: trained solution")
            axes[2].plot(px, after, "s--", label=f"{label}: pruned to the next mask")
    from .report import _setup_axis, save_figure, save_markdown
    all_x = [d["percent_remaining"] for d in results]
    for ax, ylabel, name in ((axes[0], "largest Hessian eigenvalue", "sharpness at each level's minimum"),
                             (axes[1], "||theta_r - theta_r+1|| / ||theta_r||", "distance to the next level"),
                             (axes[2], "train loss", "loss before and after pruning")):
        _setup_axis(ax, all_x)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}" if title else name, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    files = {"figure": save_figure(fig, os.path.join(out_dir, "landscape.png"))}
    files["summary"] = save_markdown(
        os.path.join(out_dir, "landscape.md"), "Loss landscape of IMP's solutions", title,
        "Top eigenvalues of the loss Hessian (over the live weights) at each round's final weights; L2 distance "
        "between consecutive rounds' final weights; the final weights pruned to the next round's mask.",
        landscape_markdown(results))
    return files

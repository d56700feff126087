"""The ``sparse-lth`` command line: ``train``, ``imp``, ``report``, ``stability``, ``landscape``, ``anatomy``,
``export``, ``ls`` and ``env``.

    sparse-lth imp --preset lenet_quick --data /work/shared/data        # an IMP run (resumes if interrupted)
    sparse-lth imp --preset lenet_quick --control reinit                # its random-reinitialization control
    sparse-lth report runs/                                             # figures + table for every experiment
    sparse-lth stability runs/lenet300_100_imp_<hash> --rounds 0,4,8    # instability analysis of those rounds
    sparse-lth landscape runs/lenet300_100_imp_<hash> --top 3           # Hessian eigenvalues, distances, ...
    sparse-lth anatomy runs/lenet300_100_imp_<hash>                     # starting weights, connectivity, ...
    sparse-lth train --model lenet300_100 --density 0.1 --iterations 1000
    sparse-lth env                                                      # what a run here will record
    sparse-lth ls runs/                                                 # the experiments and how far they got

The flags of ``imp`` (and of ``train``) are generated from the hyperparameter dataclasses
(:class:`sparse_lth.imp.ImpHparams`, :class:`sparse_lth.train.TrainConfig`): ``--prune-fc 0.2``,
``--milestones 20000,25000``, ``--prune-global/--no-prune-global`` ... A flag overrides the preset's value.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import typing


def _parse_tuple(kind, unique=False):
    """An argparse type: comma-separated ``kind`` values ("" is none; an empty item, "1,,2", is refused);
    ``unique``: each value once, in the order given (seeds and rounds to analyse: "0,0" did the work twice)."""
    def parse(s: str):
        s = s.strip()
        if not s:
            return ()
        items = [v.strip() for v in s.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"an empty item in {s!r}")
        try:
            vals = tuple(kind(v) for v in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from None
        return tuple(dict.fromkeys(vals)) if unique else vals
    parse.__name__ = f"list of {kind.__name__}"  # argparse names the type in its messages
    return parse


def _at_least(low, kind=int, high=None):
    """An argparse type: a ``kind`` number >= ``low`` (and <= ``high``; a clear usage error otherwise)."""
    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
        if not x >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        if high is not None and not x <= high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {v}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _threads():
    """--threads: 1 .. 4x this machine's cores (torch.set_num_threads crashed the process far above that)."""
    return _at_least(1, int, 4 * (os.cpu_count() or 1))


def _nonneg(kind=int):
    return _at_least(0, kind)


def _density(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"the fraction of weights kept must lie in (0, 1], got {v}")
    return x


def _remaining(v: str) -> str:
    from .report import parse_remaining
    try:
        parse_remaining(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def _field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a dataclass's source (the
    flags' help); empty where the source cannot be read."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=(), group_title=None, defaults=None,
                         types=None, comments=None) -> list[str]:
    """One flag per field of ``cls`` (default None = "not given"), its help from the field's comment; returns
    the field names. ``defaults``: the instance whose values the help shows (default ``cls()``); ``types`` and
    ``comments``: a field's flag type and help where they are not the field's."""
    hints = {**typing.get_type_hints(cls), **(types or {})}
    comments = {**_field_comments(cls), **(comments or {})}
    group = parser.add_argument_group(group_title) if group_title else parser
    names = []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = f"{comments[f.name]} (default {default!r})" if f.name in comments else f"(default {default!r})"
        helptext = helptext.replace("%", "%%")  # argparse formats help strings
        origin = typing.get_origin(t)
        if t is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=helptext)
        elif origin is tuple:
            kind = typing.get_args(t)[0]
            group.add_argument(flag, dest=f.name, type=_parse_tuple(kind), default=None, metavar="A,B,...",
                               help=f"comma-separated {kind.__name__}s: {helptext}" if f.name in comments
                               else f"comma-separated {kind.__name__}s {helptext}")
        else:
            group.add_argument(flag, dest=f.name, type=t, default=None, metavar=t.__name__.upper(), help=helptext)
        names.append(f.name)
    return names


def _given(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _write(text: str) -> None:
    """Print a line now, below any progress bar (tqdm.write keeps the bar intact)."""
    from tqdm.auto import tqdm
    tqdm.write(text)
    sys.stdout.flush()


def _check_out_file(out: str | None) -> None:
    """--out FILE of train / export: refused before any work when it cannot be written (its folder is missing, or
    it is a folder itself: train found that out after training)."""
    if not out:
        return
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out {out}: is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out {out}: its folder does not exist")


def _device(name: str):
    """``torch.device(name)``, refused clearly when it is not a device name or not on this machine."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: runs go on 'cpu' or 'cuda' (or 'cuda:N')")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: there is one CPU device, 'cpu'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    return device


def _check_cuda_graph(wanted: bool, device) -> None:
    if wanted and device.type != "cuda":
        raise ValueError(f"--cuda-graph captures the training step as a CUDA graph: it needs --device cuda, "
                         f"not {device}")


def _setup_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------- imp
def _cmd_imp(args, names) -> int:
    from .imp import ImpHparams, run_imp
    from .presets import get_preset
    given = _given(args, names)
    hp = get_preset(args.preset, **given) if args.preset else ImpHparams(**given)
    _check_cuda_graph(args.cuda_graph, _device(args.device))
    if hp.layer_impl == "masked":  # a note, not an error: folders made so before must still resume
        unused = [f"--{f.replace('_', '-')}" for f in ("path", "ops", "timed_paths", "backend") if f in given]
        if unused:
            _write(f"note: {', '.join(unused)} set how sparse layers run; --layer-impl masked (plain layers, "
                   "dense masking) does not use them, but they still name the experiment")
    if args.data:
        os.environ["SPARSE_LTH_DATA"] = args.data
    _setup_threads(args.threads)
    if args.plan:
        return _print_plan(hp, args)
    from .environment import describe, environment
    _write(f"running on: {describe(environment(args.device))}")
    t0 = time.time()
    header = f"{'seed':>4} {'round':>5} {'% left':>8} {'ES iter':>8} {'acc@ES':>7} {'acc end':>7} {'s/round':>8}"

    def line(m: dict) -> str:
        return (f"{m['seed']:>4} {m['round']:>5} {m['percent_remaining']:>8.2f} {m['early_stop_iteration']:>8} "
                f"{100 * m['early_stop_test_acc']:>7.2f} {100 * m['test_acc']:>7.2f} {m['wall_time']:>8.1f}")

    printed = []

    def round_done(m: dict) -> None:  # one line per finished round, as it finishes (also without a progress bar)
        if not printed:
            _write(header)
        printed.append(1)
        _write(line(m))

    res = run_imp(hp, args.runs, replicates=args.replicates, device=args.device, data_root=args.data,
                  progress=not args.no_progress, checkpoint_every=args.checkpoint_every, run_dir=args.run_dir,
                  wait_for_source=args.wait_for_source, report=not args.no_report, on_round_end=round_done,
                  source_dir=args.source, on_start=lambda exp: _write(f"experiment folder: {exp.dir}"),
                  cuda_graph=args.cuda_graph)
    print(f"experiment: {res.experiment_dir}  ({time.time() - t0:.0f} s)")
    print(header)
    for rounds in res.metrics.values():
        for m in rounds:
            print(line(m))
    if not args.no_report:
        print(f"report: {os.path.join(res.experiment_dir, 'report')}")
    print(f"analyses: sparse-lth stability|landscape|anatomy {res.experiment_dir}")
    return 0


def _print_plan(hp, args) -> int:
    """``imp --plan``: :meth:`sparse_lth.imp.Experiment.plan`, as text."""
    from .imp import Experiment
    exp = Experiment(hp, args.runs, device=args.device, data_root=args.data, run_dir=args.run_dir,
                     source_dir=args.source, wait_for_source=args.wait_for_source)
    seeds = [hp.seed + i for i in range(args.replicates)]
    p = exp.plan(seeds)
    _write(f"experiment folder: {p['dir']} ({'exists' if p['exists'] else 'new'})")
    for s, st in p["seeds"].items():
        where = f"round {st['running'][0]} resumes at iteration {st['running'][1]}" if st["running"] and \
            st["running"][1] is not None else ("nothing left to train" if st["done"] >= st["planned"] else
                                               f"round {st['done']} next")
        _write(f"  seed {s}: {st['done']} of {st['planned']} rounds done; {where}")
    counts = {k: sum(1 for ly in p["layers"] if ly[1] == k) for k in p["kinds"]}
    kinds = ", ".join(f"{k} {v:,} ({counts[k]} layer{'s' if counts[k] > 1 else ''})" for k, v in p["kinds"].items())
    _write(f"model {hp.model} on {exp.dataset}: {p['total']:,} prunable weights: {kinds}")
    rates = ", ".join(f"{k} {r:g}" for k, r in (("conv", hp.prune_conv), ("fc", hp.prune_fc),
                                                ("output", hp.prune_output)) if k in p["kinds"])
    by = "" if hp.prune_score == "magnitude" else f", by {hp.prune_score.replace('_', ' ')} since the rewind point"
    how = f"{'global' if hp.prune_global else 'layer-wise'}{by}"
    if hp.control == "oneshot" and hp.oneshot_remaining:
        pruning = f"pruning: once, the dense network straight to {hp.oneshot_remaining:g} of each pruned pool ({how})"
    elif hp.control == "oneshot":
        pruning = (("pruning: round r prunes the dense network at once to the sparsity r" if hp.oneshot_levels else
                    f"pruning: once, the dense network straight to the sparsity {hp.rounds}")
                   + f" IMP rounds of {rates} of the survivors reach ({how})")
    else:
        pruning = f"pruning per round: {rates} of the survivors ({how})"
    _write(pruning + (f"; kept dense: {', '.join(hp.dense_layers)}" if hp.dense_layers else "")
           + f"; control {hp.control}")
    n = len(p["rounds"])
    numerics = "".join(f", {x}" for x in ("bf16 autocast" if hp.precision == "bf16" else "",
                                          "sparse_lth optimizer" if hp.optimizer_impl == "sparse_lth" else "") if x)
    _write(f"each round: {hp.optimizer} lr {hp.lr:g}, batch {hp.batch_size}{numerics}, {p['iterations']:,} "
           f"iterations, rewind to iteration {p['rewind']}; {n} rounds = {n * p['iterations']:,} iterations per seed")
    _write(f"early stopping: at the minimum loss of {hp.val_split:,} training examples held out for validation "
           "(trained on the others)" if hp.val_split else
           "early stopping: at the minimum test loss (--val-split N holds out N training examples for it instead, "
           "as the paper)")
    if p["dense_from"]:
        _write(f"round 0 (the dense network): taken from {p['dense_from']} where it has finished there"
               + (f" (waiting up to {args.wait_for_source:g} s for it)" if args.wait_for_source else
                  ", else trained here"))
    kinds_head = "".join(f"{'% ' + k:>10}" for k in p["kinds"])
    _write(f"{'round':>5} {'% left':>8}{kinds_head}")
    for row in p["rounds"]:
        _write(f"{row['round']:>5} {row['percent']:>8.2f}" + "".join(f"{v:>10.2f}" for v in row["by_kind"].values()))
    if p["not_ready"]:
        _write(f"note: started now, the run would stop before training: {p['not_ready']}")
    _write("nothing trained or written (--plan)")
    return 0


# ----------------------------------------------------------------------------------------------------- train
def _cmd_train(args, names) -> int:
    import torch

    from .data import INPUT_SHAPES, load_dataset
    from .imp import apply_masks, get_masks, live_and_total, magnitude_prune, prunable_layers, random_masks
    from .models import build_model, default_dataset
    from .train import TrainConfig, train
    if args.layers == "dense" and args.density < 1.0:
        raise ValueError("--layers dense trains every weight: --density needs --layers sparse or masked")
    if args.layers != "sparse":
        forced = [f for f, v, d in (("--path", args.path, "auto"), ("--ops", args.ops, "auto"),
                                    ("--backend", args.backend, "auto"), ("--timed-paths", args.timed_paths, False))
                  if v != d]
        if forced:
            raise ValueError(f"{', '.join(forced)} choose how sparse layers run: they need --layers sparse, "
                             f"not {args.layers}")
    _check_out_file(args.out)
    from .imp import parse_steps
    if args.iterations is not None:
        parse_steps(args.iterations, 1, "--iterations")  # its form, refused before any work
    ticket = _train_ticket_source(args)
    _setup_threads(args.threads)
    given = _given(args, names)
    # settings not given: the run's own with --ticket (its round again, to the last digit), else TRAIN_DEFAULTS
    settings = {**TRAIN_DEFAULTS, **(_run_train_settings(ticket[0]) if ticket is not None else {}), **given}
    for name in ("data_limit", "test_limit", "val_split"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(ticket[0], name) if ticket is not None else 0)
    TrainConfig(**{**settings, "iterations": 1}, progress=False)  # the settings checked before any work
    device = _device(args.device)
    _check_cuda_graph(bool(settings.get("cuda_graph")), device)
    augment = None
    if ticket is None:
        model_name, kw = args.model or "lenet300_100", {}
        dataset = args.dataset or default_dataset(model_name)
    else:
        hp, ticket_masks, ticket_state, _ = ticket
        model_name, kw = hp.model, dict(width=hp.width, dropout=hp.dropout)
        dataset = args.dataset or hp.dataset or default_dataset(model_name)
        augment = None if hp.augment == "auto" else hp.augment == "on"
    model = build_model(model_name, seed=args.model_seed, input_shape=INPUT_SHAPES.get(dataset), **kw).to(device)
    if ticket is not None and ticket_state is not None:
        from .imp import _load_weights
        try:
            _load_weights(model, {k: v.to(device) for k, v in ticket_state.items()})
        except RuntimeError as e:  # shapes: the run's network was built for other inputs
            raise ValueError(f"--ticket {args.ticket}: its weights do not fit {model_name} on {dataset} ({e})") \
                from None
    tr = load_dataset(dataset, "train", root=args.data, device=device, augment=augment,
                      limit=args.data_limit or None)
    te = load_dataset(dataset, "test", root=args.data, device=device, limit=args.test_limit or None)
    val = None
    if args.val_split:
        try:
            tr, val = tr.split_off(args.val_split)
        except ValueError as e:
            raise ValueError(f"--val-split {args.val_split}: {e}") from None
    # "Nep": epochs of the training set (without the held-out examples) at the batch size, as IMP counts them
    ipe = math.ceil(len(tr) / settings["batch_size"]) if settings["batch_size"] > 0 else 1
    settings["iterations"] = parse_steps(settings["iterations"], ipe, "--iterations")
    cfg = TrainConfig(**settings, progress=not args.no_progress)
    if args.layers == "sparse":
        from .layers import parse_ops, sparsify
        model = sparsify(model, path=args.path, backend=None if args.backend == "auto" else args.backend,
                         ops=parse_ops(args.ops))
    masks = get_masks(model) if ticket is None else ticket[1]
    if args.density < 1.0:
        empty = [n for n, m in masks.items() if round(args.density * m.numel()) == 0]
        if empty:  # (it trained a network with those layers' every weight pruned)
            raise ValueError(f"--density {args.density:g} keeps no weight of {', '.join(empty)}: give a density of "
                             "at least one weight per layer")
        if args.mask == "random":
            g = torch.Generator().manual_seed(args.model_seed)
            masks = random_masks({n: tuple(m.shape) for n, m in masks.items()},
                                 {n: round(args.density * m.numel()) for n, m in masks.items()}, g)
        else:  # magnitude of the initial weights, layer-wise
            weights = {n: (m.dense_weight() if hasattr(m, "dense_weight") else m.weight).detach()
                       for n, m in prunable_layers(model)}
            masks = magnitude_prune(weights, masks, {n: 1.0 - args.density for n in masks})
    if args.layers != "dense":
        apply_masks(model, masks, path=None if args.path == "auto" else args.path)
    if args.layers == "sparse" and args.path == "auto":
        from .train import choose_training_paths  # timed on the device (or with --timed-paths), as it trains
        choose_training_paths(model, tr, cfg, cfg.seed, device, timed=args.timed_paths)
    start = args.start_iteration if args.start_iteration is not None else (0 if ticket is None else ticket[3])
    if start >= cfg.iterations:
        raise ValueError(f"--start-iteration {start}"
                         + (" (the round's, where the run rewound to)" if args.start_iteration is None else "")
                         + f" is not before the end of training, --iterations {cfg.iterations}")
    out = train(model, tr, te, cfg, desc=f"{model_name} {args.layers}", val_data=val, start_iteration=start)
    live, total = live_and_total(masks)
    summary = {k: out[k] for k in ("test_acc", "test_loss", "train_acc", "early_stop_iteration",
                                   "early_stop_test_acc", "early_stop_on", "wall_time", "time_per_step", "paths",
                                   "backends")}
    summary["percent_remaining"] = 100.0 * live / total if args.layers != "dense" else 100.0
    if ticket is not None:
        summary["ticket"] = dict(run_dir=args.ticket, round=args.round, seed=ticket[0].seed,
                                 weights=args.ticket_weights, dataset=dataset, start_iteration=start)
        if args.ticket_weights == "fresh":
            summary["ticket"]["model_seed"] = args.model_seed
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "environments": out["environments"], "curve": out["curve"]}, f, indent=1)
    return 0


# train's settings without --ticket, where they differ from TrainConfig's: LeNet-300-100's in the paper
TRAIN_DEFAULTS = {"optimizer": "adam", "lr": 1.2e-3, "batch_size": 60, "eval_every": 100}
# the fields of an IMP run's hyperparameters that are train's settings of the same name
_RUN_TRAIN_FIELDS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size", "iterations",
                     "milestones", "gamma", "warmup", "eval_every", "train_eval_size", "optimizer_impl", "precision",
                     "seed")


def _run_train_settings(hp) -> dict:
    """``train --ticket``: the run's training settings (its replicate's seed orders the data), each a default that
    a flag overrides. ``iterations`` stays the run's "Nit"/"Nep" (an epoch needs the training set's size)."""
    return {name: getattr(hp, name) for name in _RUN_TRAIN_FIELDS}


def _train_ticket_source(args):
    """``train --ticket``: None, or (the run's hparams, the round's masks, the weights to start from or None for
    a fresh initialization), with the flags that cannot go with it refused."""
    if args.ticket is None:
        if args.round is not None or args.ticket_seed is not None or args.ticket_weights != "start":
            raise ValueError("--round, --ticket-seed and --ticket-weights go with --ticket")
        if args.model_seed is None:
            args.model_seed = 0
        return None
    if args.model_seed is not None and args.ticket_weights != "fresh":
        raise ValueError(f"--model-seed draws new weights: with --ticket it goes with --ticket-weights fresh (the "
                         f"{args.ticket_weights!r} weights come from the run)")
    if args.round is None:
        raise ValueError("--ticket needs --round: the round whose masks to train")
    if args.model is not None:
        raise ValueError("--ticket trains the run's own network: leave out --model")
    if args.density < 1.0 or args.layers == "dense":
        raise ValueError("--ticket brings its masks: leave out --density, and train --layers sparse or masked")
    import dataclasses

    import torch

    from ._files import read_json
    from .imp import _reinit_seed, get_masks, hparams_from_dict, load_ticket, parse_steps, replicate_seeds
    run_dir = _check_experiment_dir(args.ticket)
    weights = "final" if args.ticket_weights == "final" else "start"
    model = load_ticket(run_dir, args.round, seed=args.ticket_seed, weights=weights, data_root=args.data)
    seed = args.ticket_seed if args.ticket_seed is not None else replicate_seeds(run_dir)[0]
    hp = dataclasses.replace(hparams_from_dict(read_json(os.path.join(run_dir, "hparams.json"))), seed=seed)
    if args.ticket_weights == "fresh":
        # the run's own model seed draws its theta0, the ticket's weights (with rewinding to iteration 0 exactly
        # the ticket): by default the seed the IMP driver's reinit control draws this round's weights from
        if args.model_seed is None:
            args.model_seed = _reinit_seed(seed, args.round)
        elif args.model_seed == seed and parse_steps(hp.rewind, 1, "rewind") == 0:
            raise ValueError(f"--model-seed {seed} is the run's own seed: it draws the ticket's starting weights "
                             "(theta0), not a reinitialization; leave --model-seed out (the reinit control's "
                             "seed for this round) or take another")
    masks = {n: m.detach().cpu().bool() for n, m in get_masks(model).items()}
    state = None if args.ticket_weights == "fresh" else \
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    # where the round's training began: the rewind iteration k for a round after 0 that rewinds late (it trained
    # iterations k .. T, on the batches and learning rates of those iterations)
    metrics = read_json(os.path.join(run_dir, f"seed_{seed}", f"round_{args.round:02d}", "metrics.json"))
    return hp, masks, state, int(metrics.get("start_iteration") or 0)


# ---------------------------------------------------------------------------------------------------- report
def _cmd_report(args) -> int:
    from .report import find_experiments, write_report
    dirs = find_experiments(args.run_dirs)
    files = write_report(dirs, _report_dir(args, dirs, "report"), title=args.title, remaining=args.remaining,
                         seeds=args.seeds)
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


# -------------------------------------------------------------------------------------------------------- ls
def _cmd_ls(args) -> int:
    from .listing import format_listing, list_experiments
    paths = args.paths or ["runs"]
    rows = list_experiments(paths)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "hparams"} for r in rows], indent=1))
    else:
        print(format_listing(rows))
    return 0


# ------------------------------------------------------------------------------------------------------- env
def _cmd_env(args) -> int:
    import torch

    from .environment import describe, environment
    _setup_threads(args.threads)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    envs = {d: environment(_device(d)) for d in devices}
    if args.json:
        print(json.dumps(envs, indent=1))
        return 0
    for env in envs.values():
        print(describe(env))
        if env.get("cpu_capability"):
            print("  (runs under another CPU instruction set or thread count give other numbers; "
                  "ATEN_CPU_CAPABILITY=avx2, set before Python starts, picks PyTorch's AVX2 kernels on an AVX-512 "
                  "host)")
    try:
        import triton
    except ImportError:
        print("triton: not installed (the sparse layers use the torch backend)")
        return 0
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    print(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1: its interpreter runs the kernels)" if interpreted
                                           else ""))
    return 0


# ------------------------------------------------------------------------------------------------- stability
def _check_experiment_dir(exp_dir: str) -> str:
    from .imp import check_experiment_dir
    return check_experiment_dir(exp_dir)


def _seeds_of(exp_dir: str, args) -> list[int]:
    """--seeds, else every replicate with a finished round (one just started beside the others is left out, and
    said so; named with --seeds it is an error)."""
    from .imp import finished_rounds, replicate_seeds
    if args.seeds:
        return list(args.seeds)
    seeds = replicate_seeds(exp_dir)
    if not seeds:
        raise FileNotFoundError(f"{exp_dir} holds no replicate (seed_*) yet: run the IMP experiment first")
    ready = [s for s in seeds if finished_rounds(os.path.join(exp_dir, f"seed_{s}"))]
    if not ready:
        raise FileNotFoundError(f"no replicate of {exp_dir} has a finished round yet (seeds {seeds}): run the IMP "
                                "experiment first")
    if len(ready) < len(seeds):
        left = [s for s in seeds if s not in ready]
        print(f"{exp_dir}: seed(s) {left} left out, no finished round yet (--seeds names replicates)",
              file=sys.stderr)
    return ready


def _report_dir(args, exp_dirs: list[str], name: str) -> str:
    if args.out:
        return args.out
    if len(exp_dirs) == 1:
        return os.path.join(exp_dirs[0], name)
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in exp_dirs]), name)


def _open_experiment(exp_dir: str, args):
    """(experiment, its folder, seeds) of one RUN_DIR of an analysis command, with --seeds, --device, --data."""
    from .imp import open_experiment
    exp_dir = _check_experiment_dir(exp_dir)
    seeds = _seeds_of(exp_dir, args)
    exp = open_experiment(exp_dir, seeds[0], device=args.device, data_root=args.data, progress=not args.no_progress,
                          checkpoint_every=getattr(args, "checkpoint_every", 1000))
    return exp, exp_dir, seeds


def _rounds_of(exp, exp_dir: str, seed: int, rounds) -> list[int]:
    from .imp import finished_rounds
    found = rounds if rounds else list(finished_rounds(exp.seed_dir(seed)))
    if not found:
        raise FileNotFoundError(f"seed {seed} of {exp_dir} has no finished round: run the IMP experiment first "
                                "or name the rounds with --rounds")
    return list(found)


def _analyse(args, name: str, per_seed, load, markdown, write) -> int:
    """Run ``per_seed(exp, exp_dir, seed)`` over every RUN_DIR's seeds, then write the joint report."""
    if args.data:
        os.environ["SPARSE_LTH_DATA"] = args.data
    _setup_threads(args.threads)
    _device(args.device)
    opened = [_open_experiment(d, args) for d in args.run_dirs]  # refuse a bad folder before any work
    results, model = [], opened[0][0].hp.model
    for exp, exp_dir, seeds in opened:
        for s in seeds:
            per_seed(exp, exp_dir, s)
        results += [d for d in load(exp_dir) if d["seed"] in seeds]
    files = write(results, _report_dir(args, [o[1] for o in opened], name), title=model)
    print(markdown(results), end="")
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


def _cmd_stability(args) -> int:
    from . import stability as st
    noise = tuple(args.noise_seeds) if args.noise_seeds else None
    if noise is not None and len(noise) != 2:
        raise ValueError(f"--noise-seeds takes two seeds, got {args.noise_seeds}")
    printed = []

    def header(text):
        if not printed:
            _write(text)
        printed.append(1)

    def rounds(exp, exp_dir, s):
        for r in _rounds_of(exp, exp_dir, s, args.rounds):
            d = st.instability(exp, s, r, noise_seeds=noise, points=args.points, bn_reset_batches=args.bn_reset)
            header(f"{'control':>12} {'seed':>4} {'round':>5} {'% left':>8} {'test barrier':>12} {'train barrier':>13}")
            _write(f"{d['control']:>12} {s:>4} {r:>5} {d['percent_remaining']:>8.2f} "
                   f"{100 * d['test_barrier']:>11.2f}% {100 * d['train_barrier']:>12.2f}%")

    def dense(exp, exp_dir, s):
        for d in st.dense_instability(exp, s, args.dense_at, noise_seeds=noise, points=args.points,
                                      bn_reset_batches=args.bn_reset):
            header(f"{'dense':>12} {'seed':>4} {'k':>7} {'test barrier':>12} {'train barrier':>13}")
            _write(f"{d['control']:>12} {s:>4} {d['iteration']:>7} {100 * d['test_barrier']:>11.2f}% "
                   f"{100 * d['train_barrier']:>12.2f}%")

    if args.dense_at:
        _analyse(args, "stability", dense, st.load_dense_stability, st.dense_stability_markdown,
                 st.write_dense_stability_report)
        if not args.rounds:
            return 0
        printed.clear()
    return _analyse(args, "stability", rounds, st.load_stability, st.stability_markdown, st.write_stability_report)


def _cmd_landscape(args) -> int:
    from .landscape import landscape, landscape_markdown, load_landscape, write_landscape_report

    def one(exp, exp_dir, s):
        for r in _rounds_of(exp, exp_dir, s, args.rounds):
            d = landscape(exp, s, r, top=args.top, examples=args.examples, iters=args.iters, tol=args.tol)
            eig = ", ".join(f"{e:.4g}" for e in d["eigenvalues"])
            _write(f"{d['control']} seed {s} round {r:>2} ({d['percent_remaining']:.2f}% left): top eigenvalues "
                   f"{eig}{'' if d['hessian_converged'] else ' (not converged: raise --iters)'}")
    return _analyse(args, "landscape", one, load_landscape, landscape_markdown, write_landscape_report)


def _cmd_anatomy(args) -> int:
    from .anatomy import anatomy, anatomy_markdown, write_anatomy_report
    dirs = [_check_experiment_dir(d) for d in args.run_dirs]
    _setup_threads(args.threads)
    if not args.evaluate:  # they set how --evaluate runs; without it nothing is run
        unused = [f for f, v in (("--device", args.device), ("--train-examples", args.train_examples)) if v is not None]
        if unused:
            raise ValueError(f"{' and '.join(unused)} set how --evaluate runs the networks; anatomy without "
                             "--evaluate only reads the saved files: add --evaluate, or leave "
                             f"{'them' if len(unused) > 1 else 'it'} out")
    device = _device(args.device or "cpu") if args.evaluate else "cpu"
    results = [anatomy(d, s, rounds=list(args.rounds) if args.rounds else None, evaluate=args.evaluate,
                       train_examples=args.train_examples or 0, device=device, data_root=args.data,
                       progress=not args.no_progress)
               for d in dirs for s in _seeds_of(d, args)]
    files = write_anatomy_report(results, _report_dir(args, dirs, "anatomy"), title=results[0]["model"] or "")
    print(anatomy_markdown(results), end="")
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


def _shared_ready_seeds(a: str, b: str) -> list[int]:
    """The seeds both experiments have, with a finished round in each (a replicate just started beside the others
    is left out, and said so, as the analyses do)."""
    from .imp import finished_rounds, replicate_seeds
    both = sorted(set(replicate_seeds(a)) & set(replicate_seeds(b)))
    ready = [s for s in both if all(finished_rounds(os.path.join(d, f"seed_{s}")) for d in (a, b))]
    if len(ready) < len(both):
        print(f"overlap: seed(s) {[s for s in both if s not in ready]} left out, no finished round yet in "
              f"{a} or {b} (--seeds names replicates)", file=sys.stderr)
    return ready


def _cmd_overlap(args) -> int:
    from .overlap import label_results, overlap, overlap_markdown, write_overlap_report
    a = _check_experiment_dir(args.run_a)
    others = [_check_experiment_dir(d) for d in args.run_b]
    if args.seed_b is not None and args.seeds and len(args.seeds) != 1:
        raise ValueError("--seed-b compares one replicate of A with one of each B: give at most one --seeds")
    results = []
    for b in others:
        if args.seed_b is not None:
            pairs = [(args.seeds[0] if args.seeds else 0, args.seed_b)]
        else:
            seeds = list(args.seeds) if args.seeds else _shared_ready_seeds(a, b)
            if not seeds:
                raise FileNotFoundError(f"{a} and {b} have no replicate (seed) in common with a finished round: "
                                        "name them with --seeds and --seed-b")
            pairs = [(s, s) for s in seeds]
        if os.path.samefile(a, b) and any(sa == sb for sa, sb in pairs):
            raise ValueError(f"{b} is {a} itself: a replicate against itself shares every weight; compare two "
                             "replicates of it with --seeds S --seed-b T, or give another experiment")
        results += [overlap(a, b, sa, sb, rounds=list(args.rounds) if args.rounds else None, match=args.match)
                    for sa, sb in pairs]
    label_results(results)
    files = write_overlap_report(results, _report_dir(args, [a, *others], "overlap"), title=args.title or "")
    print(overlap_markdown(results), end="")
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


def _cmd_export(args) -> int:
    import torch

    from .imp import get_masks, live_and_total, load_ticket
    _check_out_file(args.out)
    run_dir = _check_experiment_dir(args.run_dir)
    model = load_ticket(run_dir, args.round, seed=args.seed, weights=args.weights, data_root=args.data)
    live, total = live_and_total(get_masks(model))
    out = args.out or f"ticket_{os.path.basename(os.path.abspath(run_dir))}_round{args.round:02d}_{args.weights}.pt"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from ._files import write_atomic
    write_atomic(out, lambda f: torch.save(state, f), binary=True)  # a kill leaves the earlier export whole
    print(f"{out}: round {args.round} of {run_dir}, {args.weights} weights, {100.0 * live / total:.2f}% of "
          f"{total:,} weights remaining")
    print("load it into the plain network with model.load_state_dict(torch.load(path), strict=False); the masks "
          "are its '<layer>.weight_mask' entries, which a sparsified network's load_state_dict takes too")
    return 0


def _analysis_parser(sub, name: str, help_text: str, description: str, rounds_help: str, training: bool = True):
    """A subcommand that analyses experiment folders: RUN_DIR..., --rounds, --seeds, --out (and, for the ones
    that evaluate or train, --data, --device, --no-progress, --threads)."""
    p = sub.add_parser(name, help=help_text, description=description)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="experiment folders written by `sparse-lth imp` (e.g. IMP and a control, for one figure)")
    p.add_argument("--rounds", type=_parse_tuple(int, unique=True), default=None, metavar="A,B,...", help=rounds_help)
    p.add_argument("--seeds", type=_parse_tuple(int, unique=True), default=None, metavar="A,B,...",
                   help="replicates (default: every seed_* folder)")
    p.add_argument("--out", help=f"report folder (default: <RUN_DIR>/{name}, or <common parent>/{name})")
    if training:
        p.add_argument("--data", help=DATA_HELP)
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--threads", type=_threads(), default=None)
    return p


DATA_HELP = "data folder (default: $SPARSE_LTH_DATA, else ~/.cache/sparse_lth/data)"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from .imp import CONTROLS, ImpHparams
    from .presets import PRESET_NAMES
    from .train import TrainConfig
    p = argparse.ArgumentParser(prog="sparse-lth", description="Lottery tickets by iterative magnitude pruning, "
                                "trained on sparse layers.")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("imp", help="run (or resume) an IMP experiment",
                        description="Run (or resume) iterative magnitude pruning with rewinding. A finished round "
                        "is skipped on re-run; an interrupted one resumes from its last checkpoint.")
    pi.add_argument("--preset", choices=PRESET_NAMES, help="start from these hyperparameters (flags override)")
    pi.add_argument("--data", help=DATA_HELP)
    pi.add_argument("--runs", default="runs", help="run root (default: runs)")
    pi.add_argument("--run-dir", help="use this experiment folder instead of <runs>/<name>_<hash>")
    pi.add_argument("--device", default="cpu")
    pi.add_argument("--no-progress", action="store_true", help="no progress bar")
    pi.add_argument("--cuda-graph", action="store_true",
                    help="CUDA only: replay each training step as a captured CUDA graph (a LeNet-sized step on a "
                         "GPU is mostly host time; the graph skips it). How the run executes, not part of its "
                         "hyperparameters: a run resumes with or without it")
    pi.add_argument("--replicates", type=_at_least(1), default=1, help="seeds seed .. seed+N-1 (default 1)")
    pi.add_argument("--checkpoint-every", type=_nonneg(), default=1000,
                    help="checkpoint every N iterations (default %(default)s; 0: never, a killed round then starts "
                         "over)")
    pi.add_argument("--source", metavar="IMP_RUN_DIR",
                    help="controls: the IMP run to compare with (default: <runs>/<its name>, where `imp` puts it "
                         "without --run-dir); IMP: a run to take the dense round 0 from, which may prune "
                         "differently (--rounds, --prune-*, --dense-layers) but must otherwise be this one's")
    pi.add_argument("--wait-for-source", type=_nonneg(float), default=0.0,
                    help="controls, and IMP given --source: wait up to this many seconds for the source's dense "
                         "round (rather than train it again) and, for reinit/noise/random_prune, for its masks of "
                         "each round")
    pi.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    pi.add_argument("--plan", action="store_true",
                    help="print what the command would do (its folder and what is done there, the model's "
                         "prunable weights, the weights left after each round, the training budget) and exit "
                         "without training or writing")
    pi.add_argument("--threads", type=_threads(), default=None, help="torch.set_num_threads")
    imp_names = _add_dataclass_flags(pi, ImpHparams, group_title="hyperparameters (each overrides the --preset's "
                                     "value; a default shown is the value without a preset)")
    for a in pi._actions:
        if a.dest == "control":
            a.choices = CONTROLS
            a.type = str

    pt = sub.add_parser("train", help="train one (sparse) model once",
                        description="Train a model once, e.g. a sparse LeNet-300-100 on MNIST.")
    pt.add_argument("--model", default=None, help="the network (default lenet300_100; with --ticket, the run's)")
    pt.add_argument("--model-seed", type=_at_least(-2 ** 40, int, 2 ** 40 - 1), default=None,
                    help="its initialization (default 0; with --ticket-weights fresh: the new weights under the "
                         "ticket's masks, by default those the run's reinit control draws for that round)")
    pt.add_argument("--ticket", metavar="RUN_DIR",
                    help="train a ticket of an IMP run (or control): the masks of its --round, and the weights "
                         "--ticket-weights says, on --dataset (default the run's; another of the same input "
                         "shape transfers the ticket), with the run's training settings (each flag of the training group overrides one)")
    pt.add_argument("--round", type=_nonneg(), default=None, help="with --ticket: the round whose masks to train")
    pt.add_argument("--start-iteration", type=_nonneg(), default=None,
                    help="train iterations N .. --iterations, with those iterations' batches and learning rates "
                         "(default 0; with --ticket, the iteration the round began at: the run's rewind point for "
                         "a round after 0 that rewinds late)")
    pt.add_argument("--ticket-seed", type=int, default=None,
                    help="with --ticket: its replicate (default: the lowest seed)")
    pt.add_argument("--ticket-weights", choices=("start", "final", "fresh"), default="start",
                    help="with --ticket: the weights the round started from (the ticket; default), those it ended "
                         "with, or a fresh initialization (--model-seed: random reinitialization)")
    pt.add_argument("--dataset", default="", help="default: the model's")
    pt.add_argument("--data", help=DATA_HELP)
    pt.add_argument("--device", default="cpu")
    pt.add_argument("--layers", choices=("sparse", "masked", "dense"), default="sparse",
                    help="sparse layers, plain layers with dense masking, or plain dense layers")
    pt.add_argument("--density", type=_density, default=1.0, help="fraction of weights kept in every layer")
    pt.add_argument("--mask", choices=("magnitude", "random"), default="magnitude",
                    help="how the --density mask is drawn (magnitude of the initial weights, or random)")
    pt.add_argument("--path", choices=("auto", "dense", "sparse"), default="auto")
    pt.add_argument("--ops", default="auto",
                    help="the sparse path's ops: auto, sparse, dense, or op=impl pairs such as "
                         "weight_grad=dense,forward=dense (default auto)")
    pt.add_argument("--timed-paths", action="store_true",
                    help="choose the auto paths by timing on this device, each timed step with the optimizer's "
                         "step (CUDA always does; the CPU goes by density otherwise)")
    pt.add_argument("--backend", default="auto")
    pt.add_argument("--data-limit", type=_nonneg(), default=None,
                    help="the first N training examples (0: all; default 0, with --ticket the run's)")
    pt.add_argument("--test-limit", type=_nonneg(), default=None,
                    help="the first N test examples (0: all; default 0, with --ticket the run's)")
    pt.add_argument("--val-split", type=_nonneg(), default=None,
                    help="early-stop on the loss of N held-out training examples (the paper: 5000; default 0: on "
                         "the test loss; with --ticket the run's)")
    pt.add_argument("--no-progress", action="store_true")
    pt.add_argument("--out", help="write the metrics (with the curve and the environment) to this JSON file")
    pt.add_argument("--threads", type=_threads(), default=None)
    train_names = _add_dataclass_flags(
        pt, TrainConfig, skip=("progress",), defaults=TrainConfig(**TRAIN_DEFAULTS), types={"iterations": str},
        comments={"iterations": "training budget: N or 'Nit' iterations (steps), or 'Nep' epochs of the training "
                                "set at --batch-size"},
        group_title="training (a default shown is the value without --ticket; with --ticket each is the run's own, "
                    "so that its round trains again to the last digit)")

    pr = sub.add_parser("report", help="figures and a Markdown table from run folders")
    pr.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="experiment folders, or run roots holding them")
    pr.add_argument("--out", help="output folder (default: <experiment>/report, or <common parent>/report)")
    pr.add_argument("--title")
    pr.add_argument("--seeds", type=_parse_tuple(int, unique=True), default=None, metavar="A,B,...",
                    help="only these replicates (default: all), to set experiments side by side on the seeds "
                         "they share")
    pr.add_argument("--remaining", type=_remaining, default="all", metavar="KINDS",
                    help="x axis: percent of all weights remaining (all, the default), or of the weights of these "
                         "layer kinds only: conv, fc, output, comma-separated (fc,output); to set side by side "
                         "runs that prune only some layers")

    po = sub.add_parser("overlap", help="do experiments find the same ticket? the overlap of their masks",
                        description="For every round both experiment folders have finished: the live weights the "
                                    "two masks share (Jaccard index), the fraction of each mask the other keeps, "
                                    "and how many more they share than two random masks of the same per-layer "
                                    "sizes would; over all layers by round, and by layer at the last round. "
                                    "Compares replicate s of A with replicate s of each B (every seed both have, "
                                    "or --seeds), or --seeds S --seed-b T across seeds. Reads saved files only.")
    po.add_argument("run_a", metavar="RUN_A", help="an experiment folder")
    po.add_argument("run_b", metavar="RUN_B", nargs="+",
                    help="experiment folders to compare with RUN_A (or RUN_A itself, with --seed-b)")
    po.add_argument("--seeds", type=_parse_tuple(int, unique=True), default=None, metavar="A,B",
                    help="replicates to compare (default: every seed both have)")
    po.add_argument("--seed-b", type=int, default=None, help="compare --seeds S of RUN_A with this seed of RUN_B")
    po.add_argument("--rounds", type=_parse_tuple(int), default=None, metavar="R1,R2",
                    help="only these rounds of A (default: every round both have finished)")
    po.add_argument("--match", choices=("round", "remaining"), default="round",
                    help="pair round r of A with round r of B (default), or with B's round nearest in weights "
                         "remaining, within 10%% (other schedules; a one-shot run's single round)")
    po.add_argument("--out", help="folder for overlap.md and overlap.png (default: <common parent>/overlap)")
    po.add_argument("--title", default="", help="the figure's title")

    pls = sub.add_parser("ls", help="the experiments in run folders: what each is and how far it has got",
                         description="One line per experiment (and replicate): its control, rounds finished of "
                                     "those planned, the last and the best accuracy at early stop, and the round "
                                     "and iteration of a round in progress (from its checkpoint), the time to go "
                                     "at the pace of its rounds so far and the time of the last write; under it, "
                                     "the hyperparameters that tell it apart from the other experiments of its "
                                     "model. Reads files only.")
    pls.add_argument("paths", nargs="*", metavar="PATH",
                     help="experiment folders, or run roots holding them (default: runs)")
    pls.add_argument("--json", action="store_true", help="the same as JSON")

    pe = sub.add_parser("env", help="the machine, versions and code a run here records (and whose numbers it gets)",
                        description="What each IMP round records in its metrics.json: torch version, device, the "
                                    "CPU instruction set PyTorch dispatches to, threads, commit. Runs reproduce bit "
                                    "for bit only where these match.")
    pe.add_argument("--device", help="only this device (default: cpu, and cuda where there is one)")
    pe.add_argument("--threads", type=_threads(), default=None, help="as a run with --threads N would")
    pe.add_argument("--json", action="store_true", help="the records as JSON")

    ps = _analysis_parser(
        sub, "stability", "instability analysis (linear mode connectivity) of IMP rounds",
        "For each round: train two copies from the round's rewind point with different SGD noise (data order, "
        "augmentation), evaluate the network along the straight line between their final weights, and report the "
        "error barrier (Frankle et al. 2020). Finished copies are reused on re-run; interrupted ones resume.",
        "rounds to analyse (default: every finished round)")
    ps.add_argument("--noise-seeds", type=_parse_tuple(int), default=None, metavar="A,B",
                    help="data-order seeds of the two copies (default: two seeds no IMP replicate uses)")
    ps.add_argument("--dense-at", type=_parse_tuple(int), default=None, metavar="K1,K2,...",
                    help="the dense network's instability instead: copies from these iterations of its training "
                         "(e.g. 0,100,500,2000; with --rounds, both analyses)")
    ps.add_argument("--points", type=_at_least(2), default=11, help="points on the path, ends included (default 11)")
    ps.add_argument("--bn-reset", type=_nonneg(), default=0, metavar="N",
                    help="recompute batch-norm statistics on N training batches at every point (default 0: "
                         "interpolate them)")
    ps.add_argument("--checkpoint-every", type=_nonneg(), default=1000,
                    help="checkpoint the copies every N iterations (default %(default)s; 0: never)")

    pl = _analysis_parser(
        sub, "landscape", "loss-landscape measures of IMP's solutions (Hessian eigenvalues, ...)",
        "For each finished round: the largest eigenvalues of the loss Hessian over the live weights at the round's "
        "final weights (Lanczos), the distance to the next round's solution, and the loss of the solution pruned to "
        "the next round's mask (Saleem et al.).", "rounds (default: every finished round)")
    pl.add_argument("--top", type=_at_least(1), default=3, help="how many eigenvalues (default 3)")
    pl.add_argument("--examples", type=_at_least(1), default=1000,
                    help="training examples the Hessian is taken over (default 1000)")
    pl.add_argument("--iters", type=_at_least(1), default=60, help="Lanczos steps at most (default 60)")
    pl.add_argument("--tol", type=_nonneg(float), default=1e-3, help="relative residual to stop at (default 1e-3)")

    pa = _analysis_parser(
        sub, "anatomy", "what the tickets look like: starting weights, connectivity, movement, gap",
        "Read off an IMP run's saved files (no training): the survivors' starting values against all (bimodal?), "
        "incoming vs outgoing connectivity per unit, how far weights moved in the dense round by the round they "
        "were pruned in, and the generalization gap per round (Frankle & Carbin's other observations). "
        "--evaluate also runs each round's trained network on the training and test data for the gap at the end "
        "of training without the noise of the run's 1,000-example train accuracy.",
        "rounds whose starting-weight histograms to draw (default: 0, the middle and the last)")
    pa.add_argument("--evaluate", action="store_true",
                    help="evaluate each round's trained network on training and test data (needs the data); "
                         "rounds evaluated by an earlier call with the same --train-examples are not run again, "
                         "and a later call without --evaluate keeps them")
    pa.add_argument("--train-examples", type=_nonneg(), default=None,
                    help="with --evaluate: the first N training examples (default 0: all)")
    pa.set_defaults(device=None)  # --device, like --train-examples, is for --evaluate: given without it, refused
    px = sub.add_parser("export", help="save one round's subnetwork (masks and weights) as a state_dict file",
                        description="The network of a finished round of an IMP run (or a control's): its masks and "
                                    "the weights it started from (--weights start: what the round trained from) or "
                                    "ended with (--weights final), as a state_dict with dense weights and "
                                    "'<layer>.weight_mask' masks. The same from Python: "
                                    "sparse_lth.imp.load_ticket(RUN_DIR, ROUND).")
    px.add_argument("run_dir", metavar="RUN_DIR", help="an experiment folder written by `sparse-lth imp`")
    px.add_argument("--round", type=_nonneg(), required=True, help="the round (0: the dense network)")
    px.add_argument("--seed", type=int, default=None, help="the replicate (default: the lowest seed)")
    px.add_argument("--weights", choices=("start", "final"), default="start",
                    help="start: the weights the round trained from (the ticket); final: after its training")
    px.add_argument("--out", help="file (default: ./ticket_<experiment>_round<R>_<weights>.pt)")
    px.add_argument("--data", help="data folder; needed only for a training budget counted in epochs")
    return p, {"imp": imp_names, "train": train_names}


# commands whose --out is a folder (refused at once when it is a file: checked before any work)
_OUT_FOLDER = ("report", "overlap", "stability", "landscape", "anatomy")


def main(argv=None) -> int:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    import warnings
    formatwarning = warnings.formatwarning
    # a warning to the command's user is one line that names the command, not a line of the library's source
    warnings.formatwarning = lambda message, category, *_, **__: \
        f"sparse-lth {args.command}: {category.__name__}: {message}\n"
    try:
        return _run(args, names)
    finally:
        warnings.formatwarning = formatwarning


def _run(args, names) -> int:
    try:
        if args.command in _OUT_FOLDER and args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise NotADirectoryError(f"--out {args.out}: is a file; {args.command} writes a folder there")
        if args.command == "imp":
            return _cmd_imp(args, names["imp"])
        if args.command == "train":
            return _cmd_train(args, names["train"])
        if args.command == "stability":
            return _cmd_stability(args)
        if args.command == "landscape":
            return _cmd_landscape(args)
        if args.command == "anatomy":
            return _cmd_anatomy(args)
        if args.command == "env":
            return _cmd_env(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "ls":
            return _cmd_ls(args)
        if args.command == "overlap":
            return _cmd_overlap(args)
        return _cmd_report(args)
    except KeyboardInterrupt as e:
        again = {"imp": "; run the same command again to resume",
                 "stability": "; run the same command again to resume (finished copies are kept)"}
        if getattr(e, "signum", None):  # train.TrainingInterrupted: stopped between two steps, checkpoint written
            _say(f"sparse-lth {args.command}: {e}{again.get(args.command, '')}")
            return 128 + e.signum
        _say(f"\nsparse-lth {args.command}: interrupted{again.get(args.command, '')}")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # (Python's exit flush would raise again)
        except OSError:
            pass
        if args.command in _READ_ONLY:  # output piped into `head`, which has had enough: not an error of ours
            return 0
        _say(f"sparse-lth {args.command}: its output pipe closed (the reader ended) before it finished")
        return 128 + signal.SIGPIPE
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("SPARSE_LTH_DEBUG", "0") not in ("", "0"):
            raise
        from .runlock import RunInProgressError
        hint = " (SPARSE_LTH_DEBUG=1 shows the traceback)" if isinstance(e, RuntimeError) and \
            not isinstance(e, RunInProgressError) else ""
        print(f"sparse-lth {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2


# commands that only read and print: a closed output pipe (`| head`) ends them without an error
_READ_ONLY = ("ls", "env")


def _say(message: str) -> None:
    """A message on stderr, if stderr is still there (a pipe's reader may be gone)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())

"""The numbers a user reads or plots in the report and the analyses (report.py, stability.py, landscape.py): which
column holds which field, what is averaged, in what unit, on which axis, for which seeds and rounds; checked
against values computed by hand from hand-made records (no training, except where noted). Written after a mutation
campaign (session 34: 92 mutants, 48 real survivors): each test failed under a mutant the rest of the suite let
through."""
import csv
import json
import os

import pytest
import torch
from torch import nn

from conftest import tiny_data
from sparse_lth import landscape as ls
from sparse_lth import report, stability

pytestmark = pytest.mark.usefixtures("one_thread")


def _m(seed, r, pct, es_acc, **kw):
    """One round's metrics of one replicate, every field distinct unless given."""
    return dict(dict(seed=seed, round=r, percent_remaining=pct, early_stop_iteration=100, early_stop_test_acc=es_acc,
                     test_acc=es_acc - 0.05, train_acc=0.99, train_loss=0.02, test_loss=0.3, wall_time=1.0,
                     time_per_step=0.001), **kw)


def _exp(name, control, rounds, seeds, **hp):
    return dict(name=name, dir=f"/nonexistent/{name}", seeds=list(seeds), rounds=rounds,
                hparams=dict(control=control, model="lenet300_100", **hp))


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _spy_figures(monkeypatch) -> dict:
    """What every figure saved from now on draws: {file name: [per axes: dict(xlabel, ylabel, lines=[(label,
    linestyle, x, y), ...])]} (the report and the analyses save through report.save_figure)."""
    drawn = {}
    real = report.save_figure

    def spy(fig, path):
        drawn[os.path.basename(path)] = [
            dict(xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(),
                 lines=[(ln.get_label(), ln.get_linestyle(), list(ln.get_xdata()), list(ln.get_ydata()))
                        for ln in ax.get_lines()])
            for ax in fig.axes]
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", spy)
    return drawn


# ---------------------------------------------------------------------------------------------- rounds.csv
def test_rounds_csv_gives_each_field_in_its_column_and_the_axis_percent(tmp_path):
    """Every column holds its own field (test acc at the end is not the early-stop one, train acc not train loss),
    and ``remaining`` is the percent of the axis' layers (remaining="conv"), not of all weights."""
    rem = {"conv1": dict(live=50, total=100, kind="conv"), "fc1": dict(live=900, total=900, kind="fc")}
    m = _m(0, 1, 95.0, 0.91, test_acc=0.87, train_acc=0.97, train_loss=0.05, test_loss=0.4, remaining=rem,
           remaining_total=1000, wall_time=12.5, time_per_step=0.003)
    m0 = _m(0, 0, 100.0, 0.90, remaining={n: dict(v, live=v["total"]) for n, v in rem.items()})
    e = _exp("a", "imp", {0: [m0], 1: [m]}, [0])
    report._set_axis_kinds([e], ("conv",))
    path = report.write_rounds_csv([e], str(tmp_path / "rounds.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    row = rows[1]
    assert float(row["percent_remaining"]) == 95.0 and float(row["remaining"]) == 50.0
    assert float(row["early_stop_test_acc"]) == 0.91 and float(row["test_acc"]) == 0.87
    assert float(row["train_acc"]) == 0.97 and float(row["train_loss"]) == 0.05 and float(row["test_loss"]) == 0.4
    assert float(row["gain"]) == pytest.approx(0.91 - 0.90)
    assert float(row["wall_time"]) == 12.5 and float(row["time_per_step"]) == 0.003


# ------------------------------------------------------------------------------------------------- summary.md
def test_the_summary_columns_are_test_acc_at_end_and_mean_wall_time():
    """Two seeds: "test acc at end" is the mean of test_acc (not of the early-stop accuracy), the wall time the
    mean per round (not the sum); a round without train_acc (older runs) shows "-"."""
    r1 = [_m(0, 1, 80.0, 0.92, test_acc=0.80, wall_time=10.0), _m(1, 1, 80.0, 0.94, test_acc=0.84, wall_time=20.0)]
    for m in r1:
        del m["train_acc"]
    e = _exp("a", "imp", {1: r1}, [0, 1])
    row = next(ln for ln in report.summary_markdown([e]).splitlines() if ln.startswith("| 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # round, %, es iteration, test acc at es, test acc at end, train acc at end, wall, ms, paths
    assert cells[3] == "93.00 [92.00, 94.00]"
    assert cells[4] == "82.00 [80.00, 84.00]"
    assert cells[5] == "-"
    assert cells[6] == "15"


def test_the_comparison_gives_the_mean_early_stop_iteration_and_every_experiments_rounds():
    """The comparison's "@ N" is the mean early-stop iteration over replicates; a round that only a later
    experiment has gets its row (in the comparison and in the gain table)."""
    imp = _exp("a", "imp", {0: [_m(0, 0, 100.0, 0.90, early_stop_iteration=100),
                                _m(1, 0, 100.0, 0.90, early_stop_iteration=300)],
                            1: [_m(0, 1, 80.0, 0.91), _m(1, 1, 80.0, 0.91)]}, [0, 1])
    rein = _exp("b", "reinit", {0: [_m(0, 0, 100.0, 0.90)], 1: [_m(0, 1, 80.0, 0.89)],
                                2: [_m(0, 2, 64.0, 0.85)]}, [0])
    md = report.summary_markdown([imp, rein])
    table = md[md.index("## Comparison by round"):]
    row0 = next(ln for ln in table.splitlines() if ln.startswith("| 0 |"))
    assert "90.00 [90.00, 90.00] @ 200 |" in row0
    assert "| 2 | 64.00 | - | 85.00 @ 100 |" in table
    gain = report.gain_markdown([imp, rein])
    assert "| 2 | 64.00 | - | -5.00 |" in gain


def test_the_selection_table_row_is_at_the_first_experiments_sparsity():
    """Two validation-split experiments at different sparsities in round 1: the row gives the first one's, the
    other's cell names its own (as the comparison and gain tables do)."""
    curve = [dict(iteration=0, val_loss=2.0, test_loss=2.0, test_acc=0.5),
             dict(iteration=10, val_loss=1.0, test_loss=0.9, test_acc=0.90),
             dict(iteration=20, val_loss=1.1, test_loss=0.5, test_acc=0.95)]
    a = _exp("a", "imp", {1: [_m(0, 1, 80.0, 0.90, early_stop_on="val", curve=curve)]}, [0], val_split=100)
    b = _exp("b", "oneshot", {1: [_m(0, 1, 64.0, 0.90, early_stop_on="val", curve=curve)]}, [0], val_split=100)
    row = next(ln for ln in report.selection_markdown([a, b]).splitlines() if ln.startswith("| 1 |"))
    assert row.startswith("| 1 | 80.00 |") and "(64.00 %)" in row
    # at the validation choice (early_stop_test_acc 0.90, not the end of training's 0.85) / at the test choice
    assert row.count("90.00 / 95.00 / +5.00") == 2


def test_experiments_of_one_control_are_sorted_by_noise_level():
    """Noise controls are ordered by sigma (the legend and the colours follow), whatever the order given."""
    hi = _exp("hi", "noise", {0: [_m(0, 0, 100.0, 0.9)]}, [0], noise_std=2.0)
    lo = _exp("lo", "noise", {0: [_m(0, 0, 100.0, 0.9)]}, [0], noise_std=0.5)
    imp = _exp("imp", "imp", {0: [_m(0, 0, 100.0, 0.9)]}, [0])
    assert [e["name"] for e in report._sorted([hi, lo, imp])] == ["imp", "lo", "hi"]


def test_the_analyses_drawn_again_keep_to_the_seeds(monkeypatch, tmp_path):
    """report --seeds 1: the stability, dense-stability and landscape results of seed 1 only."""
    from sparse_lth import anatomy
    got = {}
    for mod, load, write, name in ((stability, "load_stability", "write_stability_report", "stability"),
                                   (stability, "load_dense_stability", "write_dense_stability_report", "dense"),
                                   (ls, "load_landscape", "write_landscape_report", "landscape")):
        monkeypatch.setattr(mod, load, lambda d: [dict(seed=0), dict(seed=1)])
        monkeypatch.setattr(mod, write, lambda rows, out, title="", name=name: got.setdefault(name, rows) and {})
    monkeypatch.setattr(anatomy, "load_anatomy", lambda d: [])
    report._analyses([dict(dir="x")], str(tmp_path), "t", seeds=[1])
    assert {k: [d["seed"] for d in v] for k, v in got.items()} == {"stability": [1], "dense": [1], "landscape": [1]}


# ---------------------------------------------------------------------------------------------------- figures
def test_the_series_line_is_the_mean_in_percent_with_the_min_max_band():
    plt = _plt()
    e = _exp("a", "imp", {0: [_m(0, 0, 100.0, 0.90), _m(1, 0, 100.0, 0.94)],
                          1: [_m(0, 1, 80.0, 0.92), _m(1, 1, 80.0, 0.96)]}, [0, 1])
    fig, ax = plt.subplots()
    report._plot_series(ax, [e], "early_stop_test_acc", {"imp": dict(color="tab:blue", marker="o")}, scale=100)
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [100.0, 80.0]
    assert list(line.get_ydata()) == pytest.approx([92.0, 94.0])
    assert len(ax.collections) == 1  # the band: two replicates
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(90.0) and ys.max() == pytest.approx(96.0)
    plt.close(fig)


def test_the_layers_figure_averages_the_replicates():
    plt = _plt()
    rounds = {}
    for r in (0, 1):
        rounds[r] = []
        for s, live in ((0, 60), (1, 80)):
            rem = {"fc1": dict(live=100 if r == 0 else live, total=100, kind="fc"),
                   "fc2": dict(live=10, total=10, kind="output")}
            rounds[r].append(_m(s, r, 100.0 * (rem["fc1"]["live"] + 10) / 110, 0.9, remaining=rem))
    fig = report.layers_figure([_exp("a", "imp", rounds, [0, 1])], "t")
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["fc1 (fc)"].get_ydata()) == pytest.approx([100.0, 70.0])
    plt.close(fig)


def test_the_x_axis_is_logarithmic_and_reversed():
    """As in the paper: log scale, sparser to the right."""
    plt = _plt()
    fig, ax = plt.subplots()
    report._setup_axis(ax, [100.0, 7.0])
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()
    plt.close(fig)


def _write_exp(root, name, control, seeds_accs, remaining=None, **hp):
    """An experiment folder on disk: hparams.json and seed_S/round_RR/metrics.json (no training)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "hparams.json").write_text(json.dumps(dict(control=control, model="lenet300_100", **hp)))
    for s, accs in seeds_accs.items():
        for r, (pct, acc) in enumerate(accs):
            curve = [dict(iteration=0, test_acc=0.1, test_loss=2.3), dict(iteration=50, test_acc=acc - 0.01,
                                                                         test_loss=0.5),
                     dict(iteration=100, test_acc=acc, test_loss=0.4)]
            m = _m(s, r, pct, acc, curve=curve, paths={})
            if remaining is not None:
                m["remaining"] = remaining[r]
            rd = d / f"seed_{s}" / f"round_{r:02d}"
            rd.mkdir(parents=True)
            (rd / "metrics.json").write_text(json.dumps(m))
    return d


def test_the_report_figures_plot_percent_and_points_on_the_chosen_axis(monkeypatch, tmp_path):
    """write_report on hand-made folders: the gain figure in points, the curves in percent, the x label of
    remaining="fc" names the fc weights, and the curves' rounds are those near the paper's levels only."""
    rem = [{"fc1": dict(live=int(1000 * f), total=1000, kind="fc"), "fc3": dict(live=100, total=100, kind="output")}
           for f in (1.0, 0.5, 0.21)]
    pcts = [100.0 * (r["fc1"]["live"] + 100) / 1100 for r in rem]
    a = _write_exp(tmp_path, "a", "imp", {0: [(pcts[0], 0.90), (pcts[1], 0.93), (pcts[2], 0.94)]}, rem)
    drawn = _spy_figures(monkeypatch)
    report.write_report([str(a)], str(tmp_path / "rep"), remaining="fc")
    acc = drawn["accuracy_vs_remaining.png"][0]
    assert acc["xlabel"] == "percent of fc weights remaining"
    assert acc["lines"][0][2] == pytest.approx([100.0, 50.0, 21.0])
    gain = [ln for ln in drawn["gain_vs_remaining.png"][0]["lines"] if ln[0].startswith("IMP")][0]
    assert gain[3] == pytest.approx([0.0, 3.0, 4.0])
    curves = drawn["curves.png"][0]["lines"]
    # the rounds nearest the paper's levels 100, 51.3, 21.1 % of all weights: 100, 54.5 and 28.2 % (all three)
    assert [ln[3][-1] for ln in curves] == pytest.approx([90.0, 93.0, 94.0])


def test_the_curves_leave_out_rounds_far_from_every_paper_level(monkeypatch, tmp_path):
    a = _write_exp(tmp_path, "a", "imp", {0: [(100.0, 0.90), (90.0, 0.92), (80.0, 0.93)]})
    drawn = _spy_figures(monkeypatch)
    report.write_report([str(a)], str(tmp_path / "rep"))
    # 100 %; 90 % and 80 % are near no level (80 % is the nearest to 51.3 %, but 1.56 times it)
    assert [ln[0] for ln in drawn["curves.png"][0]["lines"]] == ["100.0%"]


# ------------------------------------------------------------------------------------------------ stability
def _stab_rows():
    path = lambda errs: [dict(alpha=i / 2, test_error=e, train_error=e / 2) for i, e in enumerate(errs)]  # noqa
    rows = []
    for r, pct, errs, tb, trb in ((2, 64.0, [0.10, 0.30, 0.20], 0.15, 0.05), (0, 100.0, [0.12, 0.14, 0.12], 0.02, 0.01),
                                  (1, 80.0, [0.11, 0.20, 0.13], 0.08, 0.03)):
        rows.append(dict(experiment="e", seed=0, round=r, rewind_iteration=0, percent_remaining=pct,
                         noise_seeds=[1, 2], path=path(errs), test_barrier=tb, train_barrier=trb))
    return rows


def test_the_stability_table_cells():
    """Ends of the path, its largest error, then the test and the train barrier, in percent."""
    md = stability.stability_markdown(_stab_rows()[:1])
    assert md.splitlines()[2] == "| imp | 0 | 0 | 2 | 64.00 | 10.00 / 20.00 | 30.00 | 15.00 | 5.00 |"


def test_the_stability_figures_plot_barriers_in_points_against_the_weights_remaining(monkeypatch, tmp_path):
    _plt()
    drawn = _spy_figures(monkeypatch)
    stability.write_stability_report(_stab_rows(), str(tmp_path))
    test_line, train_line = drawn["barrier_vs_remaining.png"][0]["lines"]
    assert test_line[2] == [100.0, 80.0, 64.0]  # by round, x = percent remaining
    assert test_line[3] == pytest.approx([2.0, 8.0, 15.0]) and train_line[3] == pytest.approx([1.0, 3.0, 5.0])
    paths = {ln[0]: ln[3] for ln in drawn["error_along_path.png"][0]["lines"]}
    assert paths["64.0% (round 2, seed 0)"] == pytest.approx([10.0, 30.0, 20.0])


def test_a_path_row_s_train_error_is_one_minus_its_train_accuracy():
    tr, te = tiny_data(60, 30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 0.5 * torch.randn_like(v) for k, v in a.items()}
    for row in stability.linear_path(model, a, b, te, points=3, train_data=tr, train_eval_size=20):
        assert row["train_error"] == pytest.approx(1.0 - row["train_acc"])
        assert row["test_error"] == pytest.approx(1.0 - row["test_acc"])


def test_the_train_barrier_is_measured_on_the_runs_train_eval_size(tmp_path):
    """The train end of the path is evaluated on the run's own train_eval_size examples (trains a tiny run)."""
    import test_stability
    from sparse_lth.imp import Experiment, run_imp
    from sparse_lth.train import evaluate
    data = tiny_data(240, 120)
    hp = test_stability.tiny_hp(rounds=1, train_eval_size=37)
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    d = stability.instability(exp, 0, 1, noise_seeds=(1, 2), points=2)
    model, _, _ = exp.prepare_round(0, 1, recorded_paths=True)
    model.load_state_dict(torch.load(os.path.join(stability.stability_dir(exp, 0, 1), "copy_1.pt"), weights_only=False))
    tr = data[0]
    assert d["path"][0]["train_acc"] == evaluate(model, [(tr.x[:37], tr.y[:37])])[1]


# ------------------------------------------------------------------------------------------------ landscape
def _land_rows():
    rows = []
    for r, pct in ((0, 100.0), (1, 80.0)):
        rows.append(dict(experiment="e", seed=0, round=r, rewind_iteration=0, percent_remaining=pct,
                         eigenvalues=[10.0 + r, 3.0], final=dict(train_loss=0.1 + r, test_acc=0.9),
                         projected=dict(train_loss=0.5 + r, train_acc=0.7, test_acc=0.6 + r / 10),
                         distance_to_next=4.0 + r, distance_to_next_relative=0.25 + r / 10))
    return rows


def test_the_landscape_table_cells():
    md = ls.landscape_markdown(_land_rows()[:1])
    assert md.splitlines()[2] == "| imp | 0 | 0 | 0 | 100.00 | 10, 3 | 0.1000 | 4.000 (0.250) | 0.5000 / 60.00 |"


def test_the_landscape_figure_plots_the_top_eigenvalue_relative_distance_and_both_losses(monkeypatch, tmp_path):
    _plt()
    drawn = _spy_figures(monkeypatch)
    ls.write_landscape_report(_land_rows(), str(tmp_path))
    axes = [ax["lines"] for ax in drawn["landscape.png"]]
    assert axes[0][0][3] == [10.0, 11.0]
    assert axes[1][0][3] == pytest.approx([0.25, 0.35])
    loss = {ln[0]: ln[3] for ln in axes[2]}
    assert loss["seed 0: trained solution"] == pytest.approx([0.1, 1.1])
    assert loss["seed 0: pruned to the next mask"] == pytest.approx([0.5, 1.5])


def _mlp(dropout):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 10)).double()


def test_the_hvp_is_of_the_eval_mode_network_and_projects_its_vector():
    """Dropout is off (eval mode) for the Hessian, so H v is that of the network without it, every call alike;
    a vector with values on pruned coordinates gives the H v of its projection."""
    from sparse_lth.layers import sparsify
    tr, _ = tiny_data(16, 4)
    batches = [(tr.x[:, :, :10, :10].double(), tr.y)]
    with_dropout, plain = _mlp(0.5), _mlp(0.0)
    plain.load_state_dict(with_dropout.state_dict())
    with_dropout.train()
    vec = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
           for i, p in enumerate(with_dropout.parameters())]
    got = ls.hessian_vector_product(with_dropout, batches, vec)
    want = ls.hessian_vector_product(plain, batches, vec)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    g = torch.Generator().manual_seed(1)
    masks = {"1": torch.rand(6, 100, generator=g) < 0.5, "4": torch.rand(10, 6, generator=g) < 0.5}
    model = sparsify(_mlp(0.0), masks, path="dense", backend="torch")
    params = ls.masked_parameters(model)
    vec = [torch.randn(p.shape, dtype=p.dtype) for p, _ in params]
    projected = [v if m is None else v * m for v, m in zip(vec, [m for _, m in params])]
    for a, b in zip(ls.hessian_vector_product(model, batches, vec, params),
                    ls.hessian_vector_product(model, batches, projected, params)):
        torch.testing.assert_close(a, b)


def test_the_hessian_is_over_the_first_training_examples(tmp_path, monkeypatch):
    """landscape(examples=100): the Lanczos run gets the first 100 training examples and the tolerance asked
    for; the final train loss is that of the same examples (trains a tiny run)."""
    import test_landscape
    from sparse_lth.imp import Experiment, run_imp
    from sparse_lth.train import evaluate
    data = tiny_data(240, 120)
    hp = test_landscape.tiny_hp(rounds=1)
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    seen = {}
    real = ls.top_hessian_eigenvalues

    def spy(model, batches, **kw):
        seen["x"] = torch.cat([x for x, _ in batches])
        seen["tol"] = kw["tol"]
        return real(model, batches, **kw)

    monkeypatch.setattr(ls, "top_hessian_eigenvalues", spy)
    d = ls.landscape(exp, 0, 1, top=1, examples=100, iters=5, tol=1e-2, batch_size=64)
    tr = data[0]
    assert torch.equal(seen["x"], tr.x[:100]) and seen["tol"] == 1e-2
    plain = exp._build_model(0, sparse=False)
    final = torch.load(os.path.join(exp.round_dir(0, 1), "final.pt"), weights_only=False)
    plain.load_state_dict({k: v for k, v in final.items() if not k.endswith("weight_mask")})
    assert d["final"]["train_loss"] == pytest.approx(evaluate(plain, [(tr.x[:100], tr.y[:100])])[0], rel=1e-5)


def test_the_curves_draw_no_control_but_random_reinit_beside_the_ticket(monkeypatch, tmp_path):
    """A random-pruning control is in the report's figures but not among the curves (only IMP and reinit)."""
    a = _write_exp(tmp_path, "a", "imp", {0: [(100.0, 0.90), (51.2, 0.93)]})
    b = _write_exp(tmp_path, "b", "random_prune", {0: [(100.0, 0.90), (51.2, 0.80)]})
    drawn = _spy_figures(monkeypatch)
    report.write_report([str(a), str(b)], str(tmp_path / "rep"))
    assert [ln[1] for ln in drawn["curves.png"][0]["lines"]] == ["-", "-"]


def test_the_early_stop_figure_says_which_loss_chose_the_iteration(monkeypatch, tmp_path):
    a = _write_exp(tmp_path, "a", "imp", {0: [(100.0, 0.90), (51.2, 0.93)]}, val_split=50)
    drawn = _spy_figures(monkeypatch)
    report.write_report([str(a)], str(tmp_path / "rep"))
    assert drawn["early_stop_vs_remaining.png"][0]["ylabel"] == "early-stopping iteration (min validation loss)"


def test_the_curves_pick_rounds_by_the_percent_of_all_weights(monkeypatch, tmp_path):
    """remaining="fc" changes the x axis, not which rounds the curves show: those nearest the paper's levels of
    all weights, as their labels give (fc halved per round: 100, 75, 62.5 % of all weights)."""
    rem = [{"conv1": dict(live=1000, total=1000, kind="conv"), "fc1": dict(live=1000 // 2 ** r, total=1000,
                                                                               kind="fc")} for r in range(3)]
    pcts = [100.0 * (1000 + x["fc1"]["live"]) / 2000 for x in rem]
    a = _write_exp(tmp_path, "a", "imp", {0: list(zip(pcts, (0.90, 0.92, 0.93)))}, rem)
    drawn = _spy_figures(monkeypatch)
    report.write_report([str(a)], str(tmp_path / "rep"), remaining="fc")
    assert [ln[0] for ln in drawn["curves.png"][0]["lines"]] == ["100.0%", "62.5%"]


def test_labels_of_one_control_leave_out_the_seed():
    """Two IMP experiments that differ in global pruning (and were started from other seeds): the label names
    what they differ in as experiments, not the seed."""
    a = _exp("a", "imp", {0: [_m(0, 0, 100.0, 0.9)]}, [0], seed=0)
    b = _exp("b", "imp", {0: [_m(0, 0, 100.0, 0.9)]}, [0], seed=3, prune_global=True)
    assert report._label(b, [a, b]) == "IMP (winning ticket) [prune_global=True]"


def test_the_dense_masking_baseline_is_pruned_to_the_next_mask(tmp_path):
    """layer_impl="masked" (plain layers with weight_mask buffers, whose forward does not apply the mask): the
    projected loss is that of the weights multiplied by the next round's mask (trains a tiny run)."""
    import test_stability
    from sparse_lth.imp import Experiment, run_imp
    from sparse_lth.train import evaluate
    data = tiny_data(240, 120)
    hp = test_stability.tiny_hp(rounds=1, layer_impl="masked")
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    d = ls.landscape(exp, 0, 0, top=1, examples=100, iters=5, tol=1e-2, batch_size=64)
    final = torch.load(os.path.join(exp.round_dir(0, 0), "final.pt"), weights_only=False)
    nmask = torch.load(os.path.join(exp.round_dir(0, 1), "masks.pt"), weights_only=False)["masks"]
    plain = exp._build_model(0, sparse=False)
    plain.load_state_dict({k: v for k, v in final.items() if not k.endswith("weight_mask")})
    with torch.no_grad():
        for n, mk in nmask.items():
            plain.get_submodule(n).weight.mul_(mk)
    tr, te = data
    assert d["projected"]["train_loss"] == pytest.approx(evaluate(plain, [(tr.x[:100], tr.y[:100])])[0], rel=1e-5)
    assert d["projected"]["test_acc"] == evaluate(plain, te.eval_batches(1000))[1]


def test_an_axis_of_some_layers_over_rounds_without_per_layer_counts_is_refused_clearly():
    """--remaining fc over a run whose metrics.json predate the per-layer counts: a ValueError that names the
    experiment and round and what to do (it was a bare KeyError: 'remaining')."""
    old = _m(0, 1, 80.0, 0.91)
    e = _exp("old", "imp", {0: [_m(0, 0, 100.0, 0.90)], 1: [old]}, [0])
    with pytest.raises(ValueError, match=r"old: round 0 of seed 0 records no count .* without --remaining"):
        report._set_axis_kinds([e], ("fc",))
    report._set_axis_kinds([e], None)  # the percent of all weights needs no per-layer counts
    assert [row[0] for row in report._series(e, "test_acc")] == [100.0, 80.0]

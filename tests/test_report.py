"""The report's tables and file lists, on hand-made experiment records (no training)."""
import os

import pytest

from sparse_lth import anatomy, landscape, report, stability


def exp(name, control, pcts, accs):
    rounds = {r: [dict(percent_remaining=p, early_stop_iteration=100, early_stop_test_acc=a, test_acc=a,
                       train_acc=a, wall_time=1.0, time_per_step=0.001)] for r, (p, a) in enumerate(zip(pcts, accs))}
    return dict(name=name, dir=f"/nonexistent/{name}", seeds=[0], rounds=rounds,
                hparams=dict(control=control, model="lenet300_100"))


def test_the_paths_column_groups_layers_by_path():
    e = exp("a", "imp", [100.0, 2.0], [0.97, 0.98])
    e["rounds"][0][0]["paths"] = {"fc1": "dense", "fc2": "dense", "fc3": "dense"}
    two = dict(e["rounds"][1][0])
    e["rounds"][1] = [dict(two, paths={"fc1": "sparse", "fc2": "sparse", "fc3": "dense"}),
                      dict(two, paths={"fc1": "sparse", "fc2": "dense", "fc3": "dense"})]  # replicates differ on fc2
    e["seeds"] = [0, 1]
    rows = [line for line in report.summary_markdown([e]).splitlines() if line.startswith(("| 0 ", "| 1 "))]
    assert rows[0].endswith("| all dense |")
    assert rows[1].endswith("| dense: fc2, fc3; sparse: fc1, fc2 |")


def test_comparison_table_names_a_round_at_another_sparsity():
    """One-shot's single round sits at the target sparsity, not at IMP's round 1: its cell says so."""
    imp = exp("a", "imp", [100.0, 80.04, 64.06], [0.97, 0.975, 0.976])
    one = exp("b", "oneshot", [100.0, 64.06], [0.97, 0.901])
    md = report.summary_markdown([imp, one])
    table = md[md.index("## Comparison by round"):]
    row1 = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert row1.startswith("| 1 | 80.04 |") and "97.50 @ 100 |" in row1 and "90.10 @ 100 (64.06 %)" in row1
    row0 = next(line for line in table.splitlines() if line.startswith("| 0 |"))
    assert "%)" not in row0  # same sparsity: nothing added


def test_one_shot_at_each_level_is_labelled_and_sits_in_imps_rows():
    imp = exp("a", "imp", [100.0, 80.04, 64.06], [0.97, 0.975, 0.976])
    one = exp("b", "oneshot", [100.0, 80.04, 64.06], [0.97, 0.972, 0.968])
    one["hparams"]["oneshot_levels"] = True
    assert report._label(one, [imp, one]) == "one-shot at each level"
    md = report.summary_markdown([imp, one])
    table = md[md.index("## Comparison by round"):]
    row2 = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert row2.startswith("| 2 | 64.06 |") and row2.rstrip().endswith("96.80 @ 100 |")  # same sparsity: no note


def test_experiments_of_one_control_are_labelled_by_the_hyperparameters_they_differ_in():
    layerwise = exp("a", "imp", [100.0, 80.0], [0.97, 0.975])
    pooled = exp("b", "imp", [100.0, 80.0], [0.97, 0.976])
    pooled["hparams"].update(prune_global=True, milestones=[5, 10], iterations="3000")
    fast = exp("c", "imp", [100.0, 40.0], [0.97, 0.96])
    fast["hparams"].update(prune_fc=0.6, iterations="3000it")
    reinit = exp("d", "reinit", [100.0, 80.0], [0.97, 0.95])
    exps = [layerwise, pooled, fast, reinit]
    # (in the order of ImpHparams' fields; step counts in one spelling; defaults filled in)
    assert report._label(layerwise, exps) == "IMP (winning ticket) [iterations=50000it, milestones=none, " \
                                             "prune_fc=0.2, prune_global=False]"
    assert report._label(pooled, exps) == "IMP (winning ticket) [iterations=3000it, milestones=5,10, " \
                                          "prune_fc=0.2, prune_global=True]"
    assert report._label(fast, exps) == "IMP (winning ticket) [iterations=3000it, milestones=none, " \
                                        "prune_fc=0.6, prune_global=False]"
    assert report._label(reinit, exps) == "random reinit"  # the only one of its control
    twin = exp("e", "imp", [100.0, 80.0], [0.97, 0.975])  # same hyperparameters, another folder: its name
    assert report._label(twin, [layerwise, twin]) == "IMP (winning ticket) [e]"


def layered(name, prune, rounds, conv=(1000, 3000), fc=(20000, 500), kinds=True, rates=(0.1, 0.2, 0.1)):
    """An experiment record with per-layer counts: conv1/conv2 (conv), fc1 (fc), fc2 (output), each pruned at its
    rate per round when its kind is in ``prune``."""
    layers = {"conv1": ("conv", conv[0]), "conv2": ("conv", conv[1]), "fc1": ("fc", fc[0]), "fc2": ("output", fc[1])}
    rate = dict(zip(("conv", "fc", "output"), rates))
    out = exp(name, "imp", [], [])
    for r in range(rounds + 1):
        rem = {n: dict(live=round(t * (1 - rate[k]) ** r) if k in prune else t, total=t) for n, (k, t) in layers.items()}
        for n, (k, _) in layers.items():
            if kinds:
                rem[n]["kind"] = k
        live, total = sum(v["live"] for v in rem.values()), sum(v["total"] for v in rem.values())
        out["rounds"][r] = [dict(percent_remaining=100 * live / total, remaining=rem, early_stop_iteration=100,
                                 early_stop_test_acc=0.9 + r / 100, test_acc=0.9, train_acc=0.95, wall_time=1.0,
                                 time_per_step=0.001)]
    out["hparams"].update(prune_fc=rates[1] if "fc" in prune else 0.0,
                          prune_conv=rates[0] if "conv" in prune else 0.0)
    return out


def test_the_x_axis_can_be_the_weights_remaining_of_some_layer_kinds():
    """remaining="conv": the arms of a conv-only / fc-only / both ablation at equal conv sparsity (rows and
    x values), with the total beside it in each experiment's table."""
    both = layered("both", ("conv", "fc", "output"), 2)
    conv_only = layered("conv_only", ("conv",), 2)
    exps = [both, conv_only]
    report._set_axis_kinds(exps, ("conv",))
    for e in exps:
        assert [round(x[0], 2) for x in report._series(e, "test_acc")] == [100.0, 90.0, 81.0]
    md = report.summary_markdown(exps, ("conv",))
    table = md[md.index("## Comparison by round"):]
    assert "| round | % conv remaining |" in table
    row2 = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert row2.startswith("| 2 | 81.00 |") and "(" not in row2  # both at 81% of the conv weights
    own = md[md.index("`conv_only`"):md.index("## Comparison")]
    assert "| % weights remaining | % conv remaining |" in own
    total2 = 100 * (810 + 2430 + 20500) / 24500
    assert f"| 2 | {total2:.2f} | 81.00 |" in own
    # fc + output: the conv-only arm stays at 100%, so its rounds are marked with their own sparsity
    report._set_axis_kinds(exps, ("fc", "output"))
    assert report._series(conv_only, "test_acc")[2][0] == 100.0
    row1 = next(line for line in report.summary_markdown(exps, ("fc", "output")).splitlines()
                if line.startswith("| 1 |") and "(100.00 %)" in line)
    assert row1.startswith(f"| 1 | {100 * (16000 + 450) / 20500:.2f} |")
    # the default: every weight, and the tables as before
    report._set_axis_kinds(exps, None)
    assert report._series(both, "test_acc")[1][0] == both["rounds"][1][0]["percent_remaining"]
    assert "% conv remaining" not in report.summary_markdown(exps)


def test_the_layers_figure_draws_each_schedule_once():
    """layers_figure: one panel per distinct per-layer schedule (a ticket and its reinit control share one), each
    layer's percent remaining as recorded; nothing to draw without per-layer counts."""
    import copy

    import matplotlib
    matplotlib.use("Agg", force=True)
    both = layered("both", ("conv", "fc", "output"), 2)
    conv_only = layered("conv_only", ("conv",), 2)
    reinit = copy.deepcopy(both)
    reinit["name"], reinit["hparams"]["control"] = "both_reinit", "reinit"
    fig = report.layers_figure([both, conv_only, reinit], "t")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 2
    titles = [ax.get_title() for ax in shown]
    assert "random reinit" in titles[0] and "random reinit" not in titles[1]
    lines = {ln.get_label(): ln for ln in shown[1].get_lines()}  # conv only: fc1 and fc2 stay at 100%
    assert list(lines["fc1 (fc)"].get_ydata()) == [100.0] * 3
    assert list(lines["conv2 (conv)"].get_ydata()) == pytest.approx([100.0, 90.0, 81.0])
    assert list(lines["all weights"].get_xdata()) == pytest.approx(
        [m[0]["percent_remaining"] for m in conv_only["rounds"].values()])
    assert report.layers_figure([exp("a", "imp", [100.0, 80.0], [0.9, 0.91])], "t") is None
    # seven schedules (fc rates 0.20 .. 0.26): seven panels (the figure kept the first six, silently)
    seven = [layered(f"fc{i}", ("fc",), 2, rates=(0.1, 0.2 + i / 100, 0.1)) for i in range(7)]
    for e in seven:
        e["hparams"]["prune_fc"] = round(e["hparams"]["prune_fc"], 2)
    fig = report.layers_figure(seven, "t")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 7


def test_layer_kinds_come_from_the_model_for_runs_that_did_not_record_them():
    """A run from before the rounds recorded each layer's kind: LeNet-300-100 is built again from its hparams."""
    old = exp("old", "imp", [], [])
    sizes = {"fc1": 235200, "fc2": 30000, "fc3": 1000}
    for r in (0, 1):
        rem = {n: dict(live=t // (2 ** r), total=t) for n, t in sizes.items()}
        old["rounds"][r] = [dict(percent_remaining=100 * sum(v["live"] for v in rem.values()) / 266200,
                                 remaining=rem, early_stop_iteration=100, early_stop_test_acc=0.9, test_acc=0.9)]
    assert report._layer_kinds(old) == {"fc1": "fc", "fc2": "fc", "fc3": "output"}
    report._set_axis_kinds([old], ("output",))
    assert [x[0] for x in report._series(old, "test_acc")] == [100.0, 50.0]
    with pytest.raises(ValueError, match="old has no conv layers"):
        report._set_axis_kinds([old], ("conv",))
    for ms in old["rounds"].values():  # (say, a layer renamed since)
        ms[0]["remaining"]["head"] = ms[0]["remaining"].pop("fc3")
    with pytest.raises(ValueError, match=r"old: its model, built again, has other layers \(fc1, fc2, fc3\) than "
                                         r"its rounds recorded \(fc1, fc2, head\)"):
        report._set_axis_kinds([old], ("output",))


@pytest.mark.parametrize("spec,want", [("all", None), (None, None), ("conv", ("conv",)),
                                       ("fc,output", ("fc", "output")), (" fc , fc", ("fc",))])
def test_parse_remaining(spec, want):
    assert report.parse_remaining(spec) == want


@pytest.mark.parametrize("spec", ["", "linear", "conv,dense", ","])
def test_parse_remaining_refuses_unknown_kinds(spec):
    with pytest.raises(ValueError, match="layer kinds among conv, fc, output"):
        report.parse_remaining(spec)


def test_report_lists_every_analysis_file(monkeypatch, tmp_path):
    """Every analysis writer names its files "summary", "figure"...: none may hide another's in the list."""
    for mod, load, write, stem in ((stability, "load_stability", "write_stability_report", "stability"),
                                   (stability, "load_dense_stability", "write_dense_stability_report",
                                    "dense_stability"),
                                   (landscape, "load_landscape", "write_landscape_report", "landscape")):
        monkeypatch.setattr(mod, load, lambda d: [{"dir": d}])
        monkeypatch.setattr(mod, write, lambda results, out, title="", stem=stem: {
            "summary": f"{out}/{stem}.md", "figure": f"{out}/{stem}.png"})
    monkeypatch.setattr(anatomy, "load_anatomy", lambda d: [])
    files = report._analyses([exp("a", "imp", [100.0], [0.9])], str(tmp_path), "t")
    assert sorted(files.values()) == sorted(f"{tmp_path}/{s}.{x}" for s in ("stability", "dense_stability",
                                                                           "landscape") for x in ("md", "png"))


def test_long_labels_go_into_one_legend_below_the_axes():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    for labels, below in ((["IMP (winning ticket)", "random reinit"], False),
                          (["IMP (winning ticket) [rounds=16, prune_fc=0.2, prune_global=True]", "x"], True)):
        fig, axes = plt.subplots(1, 2)
        for ax in axes:
            for t in labels:
                ax.plot([1, 2], [3, 4], label=t)
        report._legend(fig, list(axes))
        assert [ax.get_legend() is not None for ax in axes] == [not below, not below]
        assert len(fig.legends) == int(below)
        if below:
            assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
        plt.close(fig)


def test_experiments_of_one_control_keep_the_order_given():
    a, b, c = exp("z_first", "imp", [100.0], [0.9]), exp("a_second", "imp", [100.0], [0.9]), \
        exp("m", "reinit", [100.0], [0.9])
    assert [e["name"] for e in report._sorted([c, a, b])] == ["z_first", "a_second", "m"]


def test_related_experiments_are_the_controls_of_the_same_hyperparameters(tmp_path):
    import json
    import os
    base = dict(model="lenet300_100", iterations="3000it", lr=0.0012)
    folders = {"imp": dict(control="imp"), "reinit": dict(control="reinit"),
               "oneshot": dict(control="oneshot", oneshot_levels=True),
               "noise": dict(control="noise", noise_std=0.5), "other_lr": dict(control="reinit", lr=0.01),
               "other_spelling": dict(control="continue", iterations="3000")}
    for name, hp in folders.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "hparams.json").write_text(json.dumps({**base, **hp}))
    got = report.related_experiments(str(tmp_path / "imp"))
    assert [os.path.basename(d) for d in got] == ["imp", "noise", "oneshot", "other_spelling", "reinit"]


def test_the_summary_names_the_data_and_the_optimizer_settings():
    e = exp("a", "imp", [100.0], [0.9])
    e["hparams"].update(dataset="fashion_mnist", optimizer="sgd", lr=0.01, momentum=0.9, batch_size=60,
                        iterations="3000it", milestones=[100, 200], gamma=0.1, warmup=0, dropout=0.0)
    line = report.summary_markdown([e]).splitlines()[2]
    assert line.startswith("model lenet300_100 on fashion_mnist, sgd lr 0.01, momentum 0.9, lr x0.1 at 100,200, "
                           "batch 60, 3000it per round")
    assert "warmup" not in line and "dropout" not in line and "width" not in line
    e["hparams"].update(width=0.5, dropout=0.1)
    assert report.summary_markdown([e]).splitlines()[2].startswith(
        "model lenet300_100 on fashion_mnist, width 0.5, dropout 0.1, sgd lr 0.01")


def test_the_summary_gives_the_early_stop_range_and_where_the_rounds_ran():
    """A mean early-stop iteration of 5500 can be 5000 and 6000: the table gives the range where seeds differ.
    The settings line says on what machine and code the rounds ran, each distinct one once."""
    e = exp("a", "imp", [100.0, 80.0], [0.97, 0.975])
    env = dict(torch="2.14.1", device="cpu: AMD EPYC (family 25, model 17)", cpu_capability="AVX512", threads=1,
               commit="cf80ff6aed2e", from_iteration=0)
    r0 = e["rounds"][0][0]
    e["rounds"][0] = [dict(r0, early_stop_iteration=5000, environments=[env]),
                      dict(r0, early_stop_iteration=6000, environments=[env])]
    e["rounds"][1][0]["environments"] = [env]
    md = report.summary_markdown([e])
    assert "| 0 | 100.00 | 5500 [5000, 6000] |" in md and "| 1 | 80.00 | 100 |" in md
    assert ("Ran on: cpu: AMD EPYC (family 25, model 17), AVX512, 1 thread, torch 2.14.1, commit cf80ff6aed2e."
            in md.splitlines()[2])
    e["rounds"][1][0]["environments"] = [env, dict(env, cpu_capability="AVX2", from_iteration=10)]
    line = report.summary_markdown([e]).splitlines()[2]
    assert "AVX512, 1 thread, torch 2.14.1, commit cf80ff6aed2e (3 rounds); " in line
    assert "AVX2, 1 thread, torch 2.14.1, commit cf80ff6aed2e (1 round)." in line
    assert "Ran on" not in report.summary_markdown([exp("b", "imp", [100.0], [0.9])])  # not recorded: nothing said


def test_the_comparison_says_when_experiments_ran_under_other_numerics():
    env = dict(torch="2.14.1", device="cpu: AMD EPYC", cpu_capability="AVX512", threads=1, commit="a",
               from_iteration=0)
    a, b = exp("a", "imp", [100.0], [0.9]), exp("b", "reinit", [100.0], [0.9])
    a["rounds"][0][0]["environments"] = [env]
    b["rounds"][0][0]["environments"] = [dict(env, commit="b")]  # another commit alone: same numerics
    assert "same numerics" not in report.summary_markdown([a, b])
    b["rounds"][0][0]["environments"] = [dict(env, cpu_capability="AVX2")]
    table = report.summary_markdown([a, b])
    assert "did not all run under the same numerics" in table[table.index("## Comparison by round"):]


def test_a_narrow_x_range_gets_round_ticks():
    """The paper's levels (100, 51.3, 21.1, 7 ...) where they fit; round numbers, spaced out, in a narrow range
    (one layer kind's weights from 100 to 28%)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    report._setup_axis(ax, [100.0, 7.13])
    assert list(ax.get_xticks()) == [100, 51.3, 21.1, 7.0]
    report._setup_axis(ax, [100.0, 28.24], "percent of conv weights remaining")
    assert list(ax.get_xticks()) == [100, 80, 60, 50, 40, 30]
    assert ax.get_xlabel() == "percent of conv weights remaining"
    plt.close(fig)


def test_rounds_that_not_every_replicate_has_finished_say_so():
    """Two seeds, the second one round behind: the last round's mean is over one seed, and the table and the
    figure say so rather than let it pass for the mean of both."""
    e = exp("a", "imp", [100.0, 80.0, 64.0], [0.90, 0.91, 0.92])
    e["seeds"] = [0, 1]
    for r in (0, 1):
        e["rounds"][r].append(dict(e["rounds"][r][0], early_stop_test_acc=0.89 + r / 100))
    other = exp("b", "reinit", [100.0, 80.0, 64.0], [0.90, 0.88, 0.86])
    md = report.summary_markdown([e, other])
    assert "| 2 (1 of 2 seeds) | 64.00 |" in md and "| 1 | 80.00 |" in md
    assert "(a round that not every replicate has finished says how many have)" in md.split("## random")[0]
    assert "not every replicate" not in md.split("## random")[1].split("## Comparison")[0]  # one seed, all done
    table = md[md.index("## Comparison by round"):]
    assert "| 2 | 64.00 | 92.00 @ 100 (1 of 2 seeds) | 86.00 @ 100 |" in table
    assert "| 1 | 80.00 | 90.50 [90.00, 91.00] @ 100 | 88.00 @ 100 |" in table

    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    report._plot_series(ax, [e, other], "early_stop_test_acc", {"imp": dict(color="tab:blue", marker="o")})
    open_markers = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert len(open_markers) == 1 and list(open_markers[0].get_xdata()) == [64.0]
    assert [ln.get_label() for ln in open_markers] == ["open: not every replicate yet"]
    plt.close(fig)


def test_a_report_of_some_seeds_only(monkeypatch, tmp_path):
    """``seeds``: the tables, the figures and the analyses of those replicates only, to set experiments side by
    side on the seeds they share; seeds that no experiment has are refused, named."""
    from conftest import tiny_data
    from test_imp import run, tiny_hp
    res = run(tiny_hp(rounds=1), tmp_path / "runs", data=tiny_data(240, 120), replicates=2)
    assert sorted(res.metrics) == [0, 1]
    written = {}
    monkeypatch.setattr(anatomy, "load_anatomy", lambda d: [dict(seed=0, experiment="x"), dict(seed=1, experiment="x")])
    monkeypatch.setattr(anatomy, "write_anatomy_report",
                        lambda rows, out, title="": written.setdefault("anatomy", rows) and {})
    report.write_report([res.experiment_dir], str(tmp_path / "one"), seeds=(1,))
    md = (tmp_path / "one" / "summary.md").read_text()
    assert "replicates: 1 (seeds [1])" in md
    for r, m in enumerate(res.metrics[1]):
        assert f"| {r} | {m['percent_remaining']:.2f} | {m['early_stop_iteration']} | " \
               f"{100 * m['early_stop_test_acc']:.2f} |" in md
    assert [d["seed"] for d in written["anatomy"]] == [1]
    files = report.write_report([res.experiment_dir], str(tmp_path / "both"))
    assert "replicates: 2 (seeds [0, 1])" in (tmp_path / "both" / "summary.md").read_text()
    # every round of every replicate, one CSV row each
    import csv
    with open(files["rounds"]) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["seed"]), int(r["round"])) for r in rows] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for row in rows:
        m = res.metrics[int(row["seed"])][int(row["round"])]
        assert float(row["early_stop_test_acc"]) == m["early_stop_test_acc"]
        assert float(row["percent_remaining"]) == m["percent_remaining"] == float(row["remaining"])
        dense = res.metrics[int(row["seed"])][0]["early_stop_test_acc"]
        assert float(row["gain"]) == pytest.approx(m["early_stop_test_acc"] - dense)
    assert os.path.getsize(files["gain"]) > 0
    with pytest.raises(ValueError, match="no finished rounds to report .* for seeds 7"):
        report.write_report([res.experiment_dir], str(tmp_path / "none"), seeds=[7])


def test_the_gain_over_the_dense_network_pairs_replicates_by_seed():
    """Each replicate's gain is over its own dense network (round 0): two seeds whose dense networks differ by a
    point but gain the same give that gain with no spread; a control's round 0 is IMP's, so its gain is its loss
    against the same dense network; a replicate without its round 0 has no gain."""
    imp = exp("a", "imp", [100.0, 80.0, 64.0], [0.90, 0.91, 0.92])
    imp["seeds"] = [0, 1]
    for r, ms in imp["rounds"].items():
        ms[0]["seed"] = 0
        ms.append(dict(ms[0], seed=1, early_stop_test_acc=ms[0]["early_stop_test_acc"] - 0.01 * (1 + (r == 2))))
    rein = exp("b", "reinit", [100.0, 80.0, 64.0], [0.90, 0.88, 0.85])
    for ms in rein["rounds"].values():
        ms[0]["seed"] = 0
    md = report.gain_markdown([imp, rein])
    assert md.startswith("## Gain over the dense network")
    rows = {ln.split(" | ")[0]: ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()}
    assert rows["| 0"] == "| 0 | 100.00 | +0.00 | +0.00 |"
    assert rows["| 1"] == "| 1 | 80.00 | +1.00 | -2.00 |"  # seed 1: 0.89 -> 0.90, as seed 0: 0.90 -> 0.91
    assert rows["| 2"] == "| 2 | 64.00 | +1.50 [+1.00, +2.00] | -5.00 |"
    del imp["rounds"][0][1]  # seed 1's dense round is missing: its later rounds have no gain
    row2 = next(ln for ln in report.gain_markdown([imp]).splitlines() if ln.startswith("| 2 |"))
    assert row2 == "| 2 | 64.00 | +2.00 (1 of 2 seeds) |"


def test_the_curves_title_names_what_the_dashed_lines_are(monkeypatch, tmp_path):
    """Two IMP runs (with and without dropout, say): the dashed curves are the second run, not "controls"."""
    from conftest import tiny_data
    from test_imp import run, tiny_hp
    data = tiny_data(240, 120)
    a = run(tiny_hp(rounds=1), tmp_path / "runs", data=data)
    b = run(tiny_hp(rounds=1, dropout=0.5), tmp_path / "runs", data=data)
    titles = {}
    real = report.save_figure

    def save(fig, path):
        titles[os.path.basename(path)] = " ".join(ax.get_title().replace("\n", " ") for ax in fig.axes)
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", save)
    report.write_report([a.experiment_dir, b.experiment_dir], str(tmp_path / "rep"), title="t")
    assert titles["curves.png"] == ("t: test accuracy during training, seed 0 (solid: IMP (winning ticket) "
                                    "[dropout=0]; dashed: IMP (winning ticket) [dropout=0.5])")
    report.write_report([a.experiment_dir], str(tmp_path / "one"), title="t")
    assert titles["curves.png"] == "t: test accuracy during training, seed 0 (IMP (winning ticket))"


def test_the_curves_draw_one_seed_for_every_experiment(monkeypatch, tmp_path):
    """IMP with seeds 0 and 1, its reinit control with seed 1 only: the curves are seed 0's, the title says so,
    and the control, which has no seed 0, is not drawn (each experiment's first replicate was drawn: IMP's seed 0
    against the control's seed 1, which differed by the seeds' spread even in their shared dense round)."""
    from conftest import tiny_data
    from test_imp import run, tiny_hp
    data = tiny_data(240, 120)
    a = run(tiny_hp(rounds=1), tmp_path / "runs", data=data, replicates=2)
    b = run(tiny_hp(rounds=1, control="reinit", seed=1), tmp_path / "runs", data=data)
    drawn = {}
    real = report.save_figure

    def save(fig, path):
        if os.path.basename(path) == "curves.png":
            drawn["title"] = fig.axes[0].get_title().replace("\n", " ")
            drawn["lines"] = [ln.get_linestyle() for ln in fig.axes[0].get_lines()]
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", save)
    report.write_report([a.experiment_dir, b.experiment_dir], str(tmp_path / "rep"), title="t")
    assert drawn["title"] == "t: test accuracy during training, seed 0 (IMP (winning ticket))"
    assert drawn["lines"] and set(drawn["lines"]) == {"-"}  # IMP's seed-0 curves only, no dashed control line


def test_the_gain_table_names_a_round_at_another_sparsity():
    """The gain (and early-stop selection) tables put each round in IMP's row: a one-shot round at another
    sparsity says its own, as the comparison table does (its -8 points sat under IMP's 80 % unmarked)."""
    imp = exp("a", "imp", [100.0, 80.04, 64.06], [0.97, 0.975, 0.976])
    one = exp("b", "oneshot", [100.0, 64.06], [0.97, 0.89])
    for e in (imp, one):
        for ms in e["rounds"].values():
            ms[0]["seed"] = 0
    row1 = next(ln for ln in report.gain_markdown([imp, one]).splitlines() if ln.startswith("| 1 |"))
    assert row1 == "| 1 | 80.04 | +0.50 | -8.00 (64.06 %) |"


def _exp3():
    e = exp("a", "imp", [100.0, 80.0], [0.90, 0.90])
    e["seeds"] = [0, 1, 2]
    e["rounds"][1] = [dict(e["rounds"][1][0], seed=s, early_stop_test_acc=a, test_acc=a, train_acc=a)
                      for s, a in zip((0, 1, 2), (0.90, 0.91, 0.99))]
    e["rounds"][0] = [dict(e["rounds"][0][0], seed=s) for s in (0, 1, 2)]
    return e


def test_the_summary_takes_the_mean_of_three_seeds_and_milliseconds_per_step():
    """Mean (not median: equal for the two seeds every test used) and ms per step (never checked)."""
    md = report.summary_markdown([_exp3()])
    row = next(l for l in md.splitlines() if l.startswith("| 1 |"))
    assert "93.33 [90.00, 99.00]" in row          # R2 mean, not median
    assert "| 1.00 |" in row                       # R5 0.001 s per step = 1.00 ms


def test_the_selection_table_gives_test_minus_validation_choice():
    """selection_markdown: accuracy at the validation choice / at the test choice / their difference (no test called
    it)."""
    e = exp("a", "imp", [100.0], [0.90])
    e["hparams"]["val_split"] = 100
    curve = [dict(iteration=0, val_loss=2.0, test_loss=2.0, test_acc=0.5),
             dict(iteration=10, val_loss=1.0, test_loss=0.9, test_acc=0.90),
             dict(iteration=20, val_loss=1.1, test_loss=0.5, test_acc=0.95)]
    e["rounds"][0][0].update(early_stop_on="val", early_stop_test_acc=0.90, curve=curve)
    md = report.selection_markdown([e])
    assert "90.00 / 95.00 / +5.00" in md

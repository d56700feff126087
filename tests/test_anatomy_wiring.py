"""What the anatomy, overlap and listing commands print and draw, and the paper's architectures: the
starting-weight statistics' thresholds and bins, the gap at early stop, movement for IMP's dense round only, the
Markdown columns, overlap's conventions and the round it pairs, `ls` rows and plans, pooling positions,
initialization, ResNet blocks and the VGG configurations. Written after a mutation campaign on anatomy.py,
overlap.py, listing.py and models.py (session 34: 88 mutants, 36 survivors): each test failed under a mutant the
rest of the suite let through, against values computed by hand or taken from the papers."""
import math

import pytest
import torch

from conftest import tiny_data
from sparse_lth.anatomy import anatomy_markdown, generalization_gap, init_weight_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_near_zero_threshold_is_half_the_std_of_all_weights_not_of_survivors():
    # all: [-2, -0.6, 0, 0.6, 2]: std sqrt(8.72 / 5) = 1.3206, half 0.660: -0.6, 0, 0.6 are near zero
    w = torch.tensor([-2.0, -0.6, 0.0, 0.6, 2.0])
    mask = torch.tensor([False, True, False, True, False])  # survivors +-0.6 (their own std 0.6: half 0.3)
    s = init_weight_stats(w, mask)
    assert s["std"] == pytest.approx(math.sqrt(8.72 / 5))
    assert s["near_zero_all"] == pytest.approx(3 / 5)
    assert s["near_zero_live"] == 1.0


def test_survivors_histogram_uses_the_layers_bins():
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])  # bins of width 0.75 over [0, 3]
    s = init_weight_stats(w, torch.tensor([False, False, True, True]), bins=4)
    assert s["edges"] == pytest.approx([0.0, 0.75, 1.5, 2.25, 3.0])
    assert s["hist_all"] == [1.0, 1.0, 1.0, 1.0]
    assert s["hist_live"] == [0.0, 0.0, 1.0, 1.0]  # 2 in [1.5, 2.25), 3 in the last bin


def test_gap_at_early_stop_reads_the_early_stopping_row_not_the_last():
    metrics = dict(early_stop_iteration=10, train_acc=0.99, test_acc=0.95,
                   curve=[dict(iteration=0, test_acc=0.1, train_acc=0.1),
                          dict(iteration=10, test_acc=0.90, train_acc=0.97),
                          dict(iteration=20, test_acc=0.95, train_acc=0.99)])
    assert generalization_gap(metrics)["at_early_stop"] == pytest.approx(0.07)


def _hand_result():
    """A hand-made anatomy result: two layers whose incoming and outgoing CVs and cut-off inputs all differ."""
    conn = {"a": dict(incoming_cv=0.1, outgoing_cv=0.5, inputs_disconnected=0.2),
            "b": dict(incoming_cv=0.3, outgoing_cv=0.9, inputs_disconnected=0.6)}
    return dict(experiment="e", seed=0, control="imp", remaining={"1": 51.2}, connectivity={"1": conn},
                generalization_gap={"1": dict(at_early_stop=0.05, at_end=0.04)}, init_weights=None,
                input_connectivity=None, movement=None)


def test_markdown_connectivity_columns():
    text = anatomy_markdown([_hand_result()])
    # incoming CV mean (0.1 + 0.3) / 2, outgoing (0.5 + 0.9) / 2, inputs cut off: the largest fraction, 60%
    assert "| 1 | 51.20 | 5.00 | 0.200 | 0.700 | 60.0% |" in text


def test_markdown_input_pixels_row():
    d = _hand_result()
    grid = [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    d["input_connectivity"] = dict(layer="fc1", rounds={"1": grid})
    text = anatomy_markdown([d])
    # 5 of 16 pixels read, 11 cut off; the central 2x2 holds 4 of the 4.5 live fraction: 88.9%
    assert "| 1 | 51.20 | 5 of 16 | 11 | 88.9% |" in text


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_movement_is_the_dense_rounds_and_only_for_imp(tmp_path):
    import os

    from sparse_lth.anatomy import anatomy
    from sparse_lth.imp import run_imp
    from test_stability import tiny_hp
    data = tiny_data(240, 120)
    res = run_imp(tiny_hp(rounds=2), str(tmp_path), progress=False, data=data)
    d = anatomy(res.experiment_dir, 0)
    sdir = os.path.join(res.experiment_dir, "seed_0")
    start, dense = _load(os.path.join(sdir, "init.pt")), _load(os.path.join(sdir, "round_00", "final.pt"))
    m1 = _load(os.path.join(sdir, "round_01", "masks.pt"))["masks"]
    m2 = _load(os.path.join(sdir, "round_02", "masks.pt"))["masks"]
    groups = {"1": [], "2": [], "survivors": []}
    for n in m1:
        move = (dense[f"{n}.weight"].double() - start[f"{n}.weight"].double()).abs()
        groups["1"].append(move[~m1[n].bool()])
        groups["2"].append(move[m1[n].bool() & ~m2[n].bool()])
        groups["survivors"].append(move[m2[n].bool()])
    for k, vs in groups.items():
        v = torch.cat(vs)
        assert d["movement"]["pooled"][k]["count"] == v.numel()
        assert d["movement"]["pooled"][k]["mean"] == pytest.approx(float(v.mean()))
    # controls whose masks or starting weights are not the IMP run's own: no movement; noise: no starting weights
    for control in ("noise", "random_prune"):
        extra = dict(noise_std=0.1) if control == "noise" else {}
        c = run_imp(tiny_hp(rounds=2, control=control, **extra), str(tmp_path), progress=False, data=data)
        a = anatomy(c.experiment_dir, 0)
        assert a["movement"] is None
        if control == "noise":
            assert a["init_weights"] is None


# ------------------------------------------------------------------------------------------------ overlap
def _first(k, n=25):
    m = torch.zeros(n, dtype=torch.bool)
    m[:k] = True
    return m


def _hand_exp(root, name, seeds):
    """An experiment folder of hand-made rounds: ``seeds = {seed: {round: (percent_remaining, mask)}}``."""
    import json
    import os
    d = os.path.join(root, name)
    for s, rounds in seeds.items():
        for r, (pct, mask) in rounds.items():
            rd = os.path.join(d, f"seed_{s}", f"round_{r:02d}")
            os.makedirs(rd)
            with open(os.path.join(rd, "metrics.json"), "w") as f:
                json.dump(dict(round=r, percent_remaining=pct), f)
            torch.save(dict(masks={"w": mask}), os.path.join(rd, "masks.pt"))
    return d


def test_overlap_by_weights_remaining_reads_bs_matched_round(tmp_path):
    from sparse_lth.overlap import overlap, overlap_markdown
    a = _hand_exp(tmp_path, "a", {0: {0: (100.0, _first(25)), 1: (48.0, _first(12))}})
    b = _hand_exp(tmp_path, "b", {0: {0: (100.0, _first(25)), 1: (76.0, _first(19)), 2: (52.0, _first(13))}})
    d = overlap(a, b, match="remaining")
    row = d["rounds"][1]
    assert (row["round"], row["round_b"], row["percent_a"], row["percent_b"]) == (1, 2, 48.0, 52.0)
    o = row["layers"]["all"]
    # A keeps weights 0-11, B's round 2 weights 0-12: 12 shared of 13 in either; chance 12 * 13 / 25 = 6.24
    assert (o["live_a"], o["live_b"], o["shared"]) == (12, 13, 12)
    assert o["jaccard"] == pytest.approx(12 / 13) and o["enrichment"] == pytest.approx(12 / 6.24)
    md = overlap_markdown([d])
    assert "| 1 / 2 | 48.00 | 52.00 | 0.923 | 1.000 | 0.923 | 1.92 |" in md


def test_overlap_compares_the_same_seed_by_default(tmp_path):
    from sparse_lth.overlap import overlap
    lo, hi = _first(12), ~_first(13)  # weights 0-11, and weights 12-24
    a = _hand_exp(tmp_path, "a", {0: {0: (100.0, _first(25)), 1: (48.0, lo)}, 1: {0: (100.0, _first(25)), 1: (52.0, hi)}})
    b = _hand_exp(tmp_path, "b", {0: {0: (100.0, _first(25)), 1: (48.0, lo)}, 1: {0: (100.0, _first(25)), 1: (52.0, hi)}})
    d = overlap(a, b, seed_a=1)
    assert d["seed_b"] == 1 and d["rounds"][1]["layers"]["all"]["jaccard"] == 1.0


def test_overlap_of_empty_masks():
    from sparse_lth.overlap import mask_overlap
    z = {"w": torch.zeros(4, dtype=torch.bool)}
    o = mask_overlap(z, z)["w"]
    assert o["jaccard"] == 1.0 and o["of_a"] == 1.0 and o["chance"] == 0.0
    assert math.isnan(o["enrichment"])  # no live weight: no enrichment to speak of


def test_overlap_figure_plots_the_share_of_as_live_weights(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.axes import Axes

    from sparse_lth.overlap import overlap, write_overlap_report
    a = _hand_exp(tmp_path, "a", {0: {0: (100.0, _first(25)), 1: (48.0, _first(12))}})
    b = _hand_exp(tmp_path, "b", {0: {0: (100.0, _first(25)), 1: (52.0, _first(13))}})
    drawn = []
    real = Axes.plot

    def record(self, *args, **kw):
        drawn.append([list(map(float, v)) for v in args[:2]])
        return real(self, *args, **kw)
    monkeypatch.setattr(Axes, "plot", record)
    write_overlap_report([overlap(a, b)], str(tmp_path / "rep"))
    # first panel: % of A's live weights B keeps (100, then 12 of 12: 100); second: enrichment (1, then 12 / 6.24)
    assert drawn[0] == [[100.0, 48.0], [100.0, 100.0]]
    assert drawn[1][0] == [100.0, 48.0] and drawn[1][1] == pytest.approx([1.0, 12 / 6.24])


# ------------------------------------------------------------------------------------------------ listing
def _hand_listed(root, name, model, rounds, **hp):
    """An experiment folder with hand-made finished rounds: ``rounds = [(percent, acc at ES, wall time)]``."""
    import json
    import os
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "hparams.json"), "w") as f:
        json.dump(dict(model=model, rounds=2, **hp), f)
    for r, (pct, acc, wall) in enumerate(rounds):
        rd = os.path.join(d, "seed_0", f"round_{r:02d}")
        os.makedirs(rd)
        with open(os.path.join(rd, "metrics.json"), "w") as f:
            json.dump(dict(round=r, percent_remaining=pct, early_stop_test_acc=acc, wall_time=wall), f)
    return d


def test_listing_rows_and_durations(tmp_path):
    from sparse_lth.listing import format_listing, list_experiments
    _hand_listed(tmp_path, "a", "resnet20", [(100.0, 0.9, 4800.0), (80.0, 0.8, 4800.0)])
    _hand_listed(tmp_path, "b", "lenet300_100", [(100.0, 0.5, 10.0), (80.0, 0.6, 10.0), (64.0, 0.7, 10.0)])
    rows = list_experiments([str(tmp_path)])
    assert [r["name"] for r in rows] == ["b", "a"]  # by model, then name
    a = rows[1]
    assert a["seeds"][0]["eta"] == 4800.0 and a["seeds"][0]["state"] == "round 2 next, about 80 min to go"
    line = format_listing(rows).splitlines()[2].split()
    # last: round 1 at 80% left, 80% accurate; best: 90% accurate, at 100% left
    assert line[:7] == ["a", "imp", "0", "2/3", "80.00", "80.00", "90.00"] and line[7] == "(100.0)"


def test_listing_compares_experiments_of_the_same_model_and_dataset_only(tmp_path):
    from sparse_lth.listing import list_experiments
    _hand_listed(tmp_path, "m", "lenet300_100", [], dataset="mnist", prune_fc=0.2)
    _hand_listed(tmp_path, "f", "lenet300_100", [], dataset="fashion_mnist", prune_fc=0.5)
    assert {r["name"]: r["differs"] for r in list_experiments([str(tmp_path)])} == dict(m=[], f=[])


# ------------------------------------------------------------------------------------------------ models
def test_convn_pools_after_each_pair_of_convs():
    """Conv-2/4/6 (LTH Figure 2): conv 64, 64, pool, 128, 128, pool, 256, 256, pool: a pool closes each pair."""
    from sparse_lth.models import build_model
    m = build_model("conv6", seed=0)
    kinds = ["pool" if isinstance(x, torch.nn.MaxPool2d) else "conv" for x in m.features
             if isinstance(x, (torch.nn.MaxPool2d, torch.nn.Conv2d))]
    assert kinds == ["conv", "conv", "pool"] * 3
    sizes = []
    for c in (x for x in m.features if isinstance(x, torch.nn.Conv2d)):
        c.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape[1:])))
    m(torch.zeros(1, 3, 32, 32))
    assert sizes == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (128, 16, 16), (256, 8, 8), (256, 8, 8)]


def test_kaiming_weights_are_normal_not_uniform():
    """Kaiming *normal* (open_lth): a 64 -> 64 conv of 36,864 weights has some beyond 3.5 std (uniform: sqrt(3))."""
    from sparse_lth.models import build_model
    w = build_model("resnet20", seed=1).blocks[8].conv1.weight
    assert w.abs().max().item() / math.sqrt(2.0 / 576) > 3.5


def _conv_output_sizes(model, kind, x):
    sizes = []
    for mod in model.modules():
        if isinstance(mod, kind):
            mod.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape[1:])))
    model.eval()
    with torch.no_grad():
        out = model(x)
    return sizes, out


@pytest.mark.parametrize("name, plan", [
    ("vgg11", [(64, 32), (128, 16), (256, 8), (256, 8), (512, 4), (512, 4), (512, 2), (512, 2)]),
    ("vgg13", [(64, 32)] * 2 + [(128, 16)] * 2 + [(256, 8)] * 2 + [(512, 4)] * 2 + [(512, 2)] * 2),
    ("vgg16", [(64, 32)] * 2 + [(128, 16)] * 2 + [(256, 8)] * 3 + [(512, 4)] * 3 + [(512, 2)] * 3),
    ("vgg19", [(64, 32)] * 2 + [(128, 16)] * 2 + [(256, 8)] * 4 + [(512, 4)] * 4 + [(512, 2)] * 4)])
def test_vgg_conv_outputs_follow_the_configurations(name, plan):
    """Simonyan & Zisserman's configurations A, B, D, E on 32x32: each max-pool halves the maps (stride 2)."""
    from sparse_lth.models import _ConvBN, build_model
    m = build_model(name, width=0.25, seed=0)
    sizes, _ = _conv_output_sizes(m, _ConvBN, torch.zeros(1, 3, 32, 32))
    assert sizes == [(c // 4, s, s) for c, s in plan]


def test_resnet_blocks_downsample_in_their_first_conv_and_add_before_the_relu():
    """He et al.: the first 3x3 conv of a downsampling block has stride 2; ReLU after the addition; global average
    pool before fc."""
    import torch.nn.functional as F

    from sparse_lth.models import BasicBlock, build_model
    m = build_model("resnet20", seed=0, bn_init="uniform")
    strides = [(b.conv1.stride, b.conv2.stride) for b in m.blocks]
    assert strides == [((1, 1), (1, 1))] * 3 + [((2, 2), (1, 1)), ((1, 1), (1, 1)), ((1, 1), (1, 1))] * 2
    sizes, out = _conv_output_sizes(m, BasicBlock, torch.randn(2, 3, 32, 32))
    assert sizes == [(16, 32, 32)] * 3 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3
    m.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    b = m.blocks[1]  # an identity block
    for bn in (b.bn1, b.bn2):
        bn.running_mean.normal_()
        bn.bias.data.normal_()
    with torch.no_grad():
        want = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))) + x)
        assert torch.allclose(b(x), want, atol=1e-6)
        feats = m.blocks(F.relu(m.bn(m.conv(torch.ones(2, 3, 32, 32) * torch.arange(32.0)))))
        assert torch.allclose(m(torch.ones(2, 3, 32, 32) * torch.arange(32.0)), m.fc(feats.mean((2, 3))), atol=1e-5)


def test_lenet_and_convn_drop_after_both_hidden_fc_layers():
    from sparse_lth.models import build_model
    for name in ("lenet300_100", "conv2"):
        m = build_model(name, dropout=0.5, seed=0).train()
        calls = []
        m.drop.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[1]))
        m(torch.zeros(2, *m.input_shape))
        assert calls == ([300, 100] if name == "lenet300_100" else [256, 256])


def test_constant_layer_histogram_spans_one_unit():
    s = init_weight_stats(torch.zeros(4), torch.tensor([True, False, True, False]), bins=2)
    assert s["edges"] == [0.0, 0.5, 1.0] and s["hist_all"] == [4.0, 0.0] and s["hist_live"] == [2.0, 0.0]


def test_overlap_pairs_the_round_nearest_in_log_weights_remaining(tmp_path):
    """A at 50%: B's 54.9% is nearer by ratio (x1.098) than its 45.5% (x1.099), though 4.9 points away, not 4.5."""
    from sparse_lth.overlap import overlap
    n = 1000
    a = _hand_exp(tmp_path, "a", {0: {0: (100.0, _first(n, n)), 1: (50.0, _first(500, n))}})
    b = _hand_exp(tmp_path, "b", {0: {0: (100.0, _first(n, n)), 1: (54.9, _first(549, n)), 2: (45.5, _first(455, n))}})
    assert [row["round_b"] for row in overlap(a, b, match="remaining")["rounds"]] == [0, 1]


def test_vgg_conv_bn_relu_order_and_max_pools():
    """open_lth's cifar_vgg: conv -> BN -> ReLU, and 2x2 *max* pools (4 of them)."""
    import torch.nn.functional as F

    from sparse_lth.models import build_model
    m = build_model("vgg11", width=0.25, seed=0, bn_init="uniform").eval()
    assert sum(isinstance(x, torch.nn.MaxPool2d) for x in m.modules()) == 4
    assert not any(isinstance(x, torch.nn.AvgPool2d) for x in m.modules())
    layer = m.layers[0]
    layer.bn.running_mean.fill_(1.0)
    layer.bn.bias.data.normal_()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.relu(layer.bn(layer.conv(x))), atol=1e-6)


def test_a_oneshot_run_to_each_level_plans_every_round(tmp_path):
    import json
    import os

    from sparse_lth.listing import list_experiments
    for name, kw in (("levels", dict(oneshot_levels=True)), ("once", {})):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "hparams.json", "w") as f:
            json.dump(dict(model="lenet300_100", control="oneshot", rounds=4, **kw), f)
    assert {r["name"]: r["planned"] for r in list_experiments([str(tmp_path)])} == dict(levels=5, once=2)

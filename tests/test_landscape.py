"""Loss-landscape measures: Hessian-vector products and Lanczos eigenvalues over the live weights against the
explicit Hessian, on plain masked, dense-path and sparse-path layers; the per-round measures of an IMP run and
the ``landscape`` CLI."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import test_stability
from conftest import tiny_data
from test_cli import tiny_imp_args
from test_stability import load
from sparse_lth import landscape as ls
from sparse_lth.imp import Experiment, run_imp
from sparse_lth.layers import sparsify
from sparse_lth.landscape import hessian_vector_product, masked_parameters, top_hessian_eigenvalues
from sparse_lth.stability import instability
from sparse_lth.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def net(conv: bool):
    """Small enough (~500-1100 parameters, 10x10 inputs) for the explicit Hessian."""
    torch.manual_seed(0)
    if conv:
        return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).double()
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 6), nn.Tanh(), nn.Linear(6, 10)).double()


def layer_masks(model, density=0.5):
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(m.weight.shape, generator=g) < density for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def explicit_live_hessian(model, masks, batches):
    """The Hessian of the mean cross-entropy w.r.t. all parameters, restricted to the live coordinates."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = sum(y.numel() for _, y in batches)

    def loss(flat):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return sum(F.cross_entropy(functional_call(model, d, (x,)), y, reduction="sum") for x, y in batches) / total
    h = torch.autograd.functional.hessian(loss, flat0)
    live = torch.cat([masks[n.rsplit(".", 1)[0]].reshape(-1) if n.endswith("weight") else
                      torch.ones(s.numel(), dtype=torch.bool) for n, s in zip(names, shapes)])
    return h[live][:, live]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("kind", ["plain", "dense", "sparse"])
def test_top_eigenvalues_match_the_explicit_hessian(conv, kind):
    tr, _ = tiny_data(48, 10)
    x = tr.x[:, :, 9:19, 9:19].double()
    batches = [(x[:32], tr.y[:32]), (x[32:], tr.y[32:])]
    ref = net(conv)
    masks = layer_masks(ref)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n in masks:
                m.weight.mul_(masks[n])
    want = torch.linalg.eigvalsh(explicit_live_hessian(ref, masks, batches)).flip(0)
    if kind == "plain":  # a plain layer with a weight_mask buffer (the dense-masking baseline)
        model = net(conv)
        for n, m in model.named_modules():
            if n in masks:
                m.register_buffer("weight_mask", masks[n])
                with torch.no_grad():  # (the training loop keeps such weights masked)
                    m.weight.mul_(masks[n])
    else:
        model = sparsify(net(conv), masks, path=kind, backend="torch")
    got = top_hessian_eigenvalues(model, batches, k=3, iters=120, tol=1e-9)
    assert got["converged"] and got["parameters"] == want.numel()
    torch.testing.assert_close(torch.tensor(got["eigenvalues"], dtype=torch.float64), want[:3], rtol=1e-8, atol=1e-10)
    if not conv:  # here the eigenvalue largest in size is negative: Lanczos gives the largest algebraic ones
        assert want[-1] < 0 and want[-1].abs() > want[0] and got["eigenvalues"][0] > 0


def test_hvp_stays_on_the_live_weights():
    tr, _ = tiny_data(16, 4)
    model = net(False)
    masks = layer_masks(model)
    model = sparsify(model, masks, path="dense", backend="torch")
    params = masked_parameters(model)
    vec = [torch.randn(p.shape, dtype=p.dtype) for p, _ in params]  # dead coordinates too: projected away
    hv = hessian_vector_product(model, [(tr.x[:, :, :10, :10].double(), tr.y)], vec, params)
    for (p, m), h in zip(params, hv):
        if m is not None:
            assert (h[m == 0] == 0).all() and h[m != 0].abs().sum() > 0
    assert model.training  # put back


def test_eigenvalue_requests_are_checked():
    tr, _ = tiny_data(8, 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 2)).double()
    b = [(tr.x.double(), tr.y)]
    with pytest.raises(ValueError, match="live coordinates"):
        top_hessian_eigenvalues(sparsify(model, {"1": torch.eye(2, 784, dtype=torch.bool)}, path="sparse"), b, k=5)
    with pytest.raises(ValueError, match=">= 1"):
        top_hessian_eigenvalues(model, b, k=0)
    with pytest.raises(ValueError, match="at least one example"):
        hessian_vector_product(model, [], [torch.zeros_like(p) for p in model.parameters()])


# ------------------------------------------------------------------------------------------- on an IMP run
def tiny_hp(**kw):
    return test_stability.tiny_hp(**{"path": "auto", **kw})


def test_landscape_of_imp_rounds(tmp_path, monkeypatch):
    data = tiny_data(240, 120)
    hp = tiny_hp()
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    out = [ls.landscape(exp, 0, r, top=2, examples=100, iters=40, tol=1e-4, batch_size=64) for r in range(3)]
    tr, te = data
    for r, d in enumerate(out):
        assert d["round"] == r and len(d["eigenvalues"]) == 2 and d["eigenvalues"][0] >= d["eigenvalues"][1]
        assert d["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        final = load(os.path.join(exp.round_dir(0, r), "final.pt"))
        masks = load(os.path.join(exp.round_dir(0, r), "masks.pt"))["masks"]
        assert d["live_parameters"] == sum(int(m.sum()) for m in masks.values()) + sum(
            final[k].numel() for k in final if k.endswith("bias"))
        if r < 2:  # the distance to the next solution, and this solution pruned to the next mask
            nxt = load(os.path.join(exp.round_dir(0, r + 1), "final.pt"))
            nmask = load(os.path.join(exp.round_dir(0, r + 1), "masks.pt"))["masks"]
            dist = math.sqrt(sum(float(((final[f"{n}.weight"] - nxt[f"{n}.weight"]).double() ** 2).sum())
                                 for n in masks))
            assert d["distance_to_next"] == pytest.approx(dist, rel=1e-9)
            plain = exp._build_model(0, sparse=False)
            plain.load_state_dict({k: v for k, v in final.items() if not k.endswith("weight_mask")})
            with torch.no_grad():
                for n, mk in nmask.items():
                    plain.get_submodule(n).weight.mul_(mk)
            loss, acc = evaluate(plain, te.eval_batches(1000))
            assert d["projected"]["test_acc"] == acc and d["projected"]["test_loss"] == pytest.approx(loss, rel=1e-5)
            assert d["projected"]["train_loss"] == pytest.approx(evaluate(plain, [(tr.x[:100], tr.y[:100])])[0],
                                                                 rel=1e-5)
            assert d["projected"]["percent_remaining"] < d["percent_remaining"]
        else:
            assert d["projected"] is None and d["distance_to_next"] is None
        with open(os.path.join(exp.round_dir(0, r), "landscape.json")) as f:
            assert json.load(f) == json.loads(json.dumps(d))
    # finished measures are read back; new settings compute again
    calls, real = [], ls.top_hessian_eigenvalues
    monkeypatch.setattr(ls, "top_hessian_eigenvalues", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ls.landscape(exp, 0, 1, top=2, examples=100, iters=40, tol=1e-4) == json.loads(json.dumps(out[1]))
    assert calls == []
    assert len(ls.landscape(exp, 0, 1, top=1, examples=100, iters=40, tol=1e-4)["eigenvalues"]) == 1
    assert calls == [1]
    # a random-reinit control's next round neither prunes nor starts from this solution: no chain measures
    rhp = tiny_hp(control="reinit")
    run_imp(rhp, str(tmp_path), progress=False, data=data)
    rexp = Experiment(rhp, str(tmp_path), progress=False, data=data)
    rd = ls.landscape(rexp, 0, 1, top=1, examples=100, iters=40, tol=1e-4)
    assert rd["control"] == "reinit" and len(rd["eigenvalues"]) == 1
    assert rd["projected"] is None and rd["distance_to_next"] is None
    # one-shot at each level: round 1 is pruned from round 0's solution, round 2 is not (from round 0's too)
    ohp = tiny_hp(control="oneshot", oneshot_levels=True)
    run_imp(ohp, str(tmp_path), progress=False, data=data)
    oexp = Experiment(ohp, str(tmp_path), progress=False, data=data)
    o0, o1 = (ls.landscape(oexp, 0, r, top=1, examples=100, iters=40, tol=1e-4) for r in (0, 1))
    assert o0["projected"] is not None and o0["distance_to_next"] is not None
    assert o1["projected"] is None and o1["distance_to_next"] is None
    files = ls.write_landscape_report(ls.load_landscape(exp.dir), str(tmp_path / "rep"), title="tiny")
    assert os.path.getsize(files["figure"]) > 0 and "| imp | 0 | 0 | 2 |" in open(files["summary"]).read()


def test_landscape_is_the_same_on_dense_masking_and_sparse_layers(tmp_path):
    """The dense-masking baseline (plain layers with weight_mask buffers) and sparse-lth's layers train the same
    network here (the dense path), so their Hessians at each solution agree; the stability analysis runs on the
    baseline too, and its copy with the replicate's seed is the IMP round."""
    data = tiny_data(240, 120)
    out = {}
    for impl in ("masked", "sparse"):
        hp = test_stability.tiny_hp(layer_impl=impl, rounds=1)
        run_imp(hp, str(tmp_path), progress=False, data=data)
        exp = Experiment(hp, str(tmp_path), progress=False, data=data)
        out[impl] = ls.landscape(exp, 0, 1, top=2, examples=100, iters=40, tol=1e-6)
        if impl == "masked":
            instability(exp, 0, 1, noise_seeds=(0, 3), points=3)
            final = load(os.path.join(exp.round_dir(0, 1), "final.pt"))
            copy = load(os.path.join(exp.round_dir(0, 1), "stability", "copy_0.pt"))
            assert all(torch.equal(final[k], copy[k]) for k in final)
    assert out["masked"]["live_parameters"] == out["sparse"]["live_parameters"]
    assert out["masked"]["eigenvalues"] == pytest.approx(out["sparse"]["eigenvalues"], rel=1e-5)


def test_landscape_needs_a_finished_round(tmp_path):
    data = tiny_data(240, 120)
    exp = Experiment(tiny_hp(), str(tmp_path), progress=False, data=data)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        ls.landscape(exp, 0, 0)
    # a relative residual of 1 or more "converges" at once (inf gave a wrong top eigenvalue, not flagged)
    for tol in (float("inf"), 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"tol must be in \[0, 1\)"):
            ls.landscape(exp, 0, 0, tol=tol)


def test_landscape_cli(tmp_path, capsys):
    from conftest import require_shared_data
    from sparse_lth.cli import main
    data = str(require_shared_data())
    assert main(tiny_imp_args(tmp_path, "--no-report", "--rounds", "1")) == 0
    exp = next(p for p in tmp_path.iterdir() if p.name.startswith("lenet300_100_imp_"))
    capsys.readouterr()
    assert main(["landscape", str(exp), "--data", data, "--top", "2", "--examples", "100", "--iters", "30"]) == 0
    out = capsys.readouterr().out
    assert "seed 0 round  0" in out and "seed 0 round  1" in out and "| experiment | k | seed | round |" in out
    for r in (0, 1):
        with open(exp / "seed_0" / f"round_{r:02d}" / "landscape.json") as f:
            assert len(json.load(f)["eigenvalues"]) == 2
    assert (exp / "landscape" / "landscape.png").stat().st_size > 0
    assert main(["report", str(exp), "--out", str(tmp_path / "rep")]) == 0  # drawn again by `report`
    assert (tmp_path / "rep" / "landscape.png").stat().st_size > 0
    assert main(["landscape", str(exp / "seed_0"), "--data", data]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    assert main(["landscape", str(exp), "--data", data, "--tol", "inf"]) == 2
    assert "tol must be in [0, 1), got inf" in capsys.readouterr().err


def test_a_bf16_run_s_losses_are_evaluated_as_the_run_evaluated_them(tmp_path):
    """The losses of a bf16 run's solution (and of its projection) are evaluated under bf16 autocast, as the run
    evaluated them: its test loss equals the round's own at the end of training (it was evaluated in fp32 and
    differed in the third digit, beside the run's bf16 figures). The Hessian stays in fp32, recorded; a result
    from before (no precision recorded) is computed again for a bf16 run."""
    data = tiny_data(240, 120)
    hp = tiny_hp(rounds=1, precision="bf16")
    run_imp(hp, str(tmp_path), progress=False, data=data)
    exp = Experiment(hp, str(tmp_path), progress=False, data=data)
    metrics = json.loads(open(os.path.join(exp.round_dir(0, 1), "metrics.json")).read())
    tr, te = data
    d = ls.landscape(exp, 0, 1, top=1, examples=100, iters=20, batch_size=64)
    assert d["precision"] == "bf16" and d["hessian_precision"] == "fp32"
    assert len(te) <= 1000 and d["final"]["test_loss"] == metrics["test_loss"]
    path = os.path.join(exp.round_dir(0, 1), "landscape.json")
    old = json.loads(open(path).read())
    del old["precision"]
    old["final"]["test_loss"] = -1.0
    with open(path, "w") as f:
        json.dump(old, f)
    assert ls.landscape(exp, 0, 1, top=1, examples=100, iters=20, batch_size=64)["final"]["test_loss"] == \
        metrics["test_loss"]


def _run_tiny(tmp_path, **kw):
    from sparse_lth.imp import Experiment, run_imp
    data = tiny_data(240, 120)
    hp = tiny_hp(**kw)
    res = run_imp(hp, str(tmp_path), progress=False, data=data)
    return res, Experiment(hp, str(tmp_path), progress=False, data=data)


def test_the_distance_to_the_next_solution_is_relative_and_filled_in_once_it_exists(tmp_path):
    """distance_to_next_relative is the distance over the norm of the final prunable weights (plotted; never
    checked), and a cached round whose next round has finished since gets its distance."""
    res, exp = _run_tiny(tmp_path, rounds=1)
    nxt = os.path.join(exp.round_dir(0, 1), "final.pt")
    os.rename(nxt, nxt + ".away")
    first = ls.landscape(exp, 0, 0, top=1, examples=100, iters=10, tol=1e-2, batch_size=64)
    assert first["distance_to_next"] is None
    os.rename(nxt + ".away", nxt)
    d = ls.landscape(exp, 0, 0, top=1, examples=100, iters=10, tol=1e-2, batch_size=64)
    assert d["distance_to_next"] is not None                                  # L6
    final = torch.load(os.path.join(exp.round_dir(0, 0), "final.pt"), weights_only=False)
    masks = torch.load(os.path.join(exp.round_dir(0, 0), "masks.pt"), weights_only=False)["masks"]
    norm = math.sqrt(sum(float((final[f"{n}.weight"].double() ** 2).sum()) for n in masks))
    assert d["distance_to_next_relative"] == pytest.approx(d["distance_to_next"] / norm, rel=1e-9)  # L4

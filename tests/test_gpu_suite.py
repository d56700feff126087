"""benchmarks/gpu_suite.sh, the one-call plan a session with a lent GPU runs, checked here with stand-ins for python3
and timeout: which commands each part runs, under which time limits, the budget, and what comes back through $OUT.
(The benchmarks themselves are checked by their dry runs in test_benchmark_scripts.py.)"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PY = r"""#!/usr/bin/env bash
# stands in for python3: records its arguments; a benchmark writes one CSV row where it would write its results
echo "PY $*" >> "$FAKE_LOG"
case "$*" in
    *get_device_name*) echo fake-h200; exit 0 ;;
    *"import xdist"*) exit 0 ;;
    *"import torch, triton"*) echo "torch 0 triton 0 fake"; exit 0 ;;
esac
out=""
prev=""
for a in "$@"; do
    [ "$prev" = "--out" ] && out="$a"
    prev="$a"
done
script=$(basename "${1:-x}" .py)
if [ -z "$out" ] && [ "${1:-}" != "-m" ]; then
    out="benchmarks/results/${script#bench_}_fake-h200.csv"
fi
[ -n "$out" ] && echo "device,median_ms" > "$out" && echo "fake-h200,1.0" >> "$out"
exit 0
"""

FAKE_TIMEOUT = r"""#!/usr/bin/env bash
echo "TIMEOUT $1" >> "$FAKE_LOG"
shift
exec "$@"
"""


def install_fakes(tmp_path, python: str = FAKE_PY):
    """The python3 and timeout stand-ins in ``tmp_path/bin`` and an empty ``$OUT`` folder: (bin_dir, out, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", python), ("timeout", FAKE_TIMEOUT)):
        f = bin_dir / name
        f.write_text(text)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    out.mkdir()
    return bin_dir, out, tmp_path / "calls.log"


@pytest.fixture
def suite(tmp_path):
    """A copy of the suite in a scratch tree (it writes under its own benchmarks/results/), fakes on PATH."""
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_suite.sh", tree / "benchmarks" / "gpu_suite.sh")
    bin_dir, out, log = install_fakes(tmp_path)

    def run(*parts, budget=None):
        log.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PART_LIMIT", "SUITE_BUDGET", "PYTHON")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out), FAKE_LOG=str(log))
        if budget is not None:
            env["SUITE_BUDGET"] = str(budget)
        r = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_suite.sh"), *parts], env=env,
                           capture_output=True, text=True, timeout=120)
        calls = log.read_text().splitlines() if log.exists() else []
        return r, calls, out

    return run


def test_plan15_runs_the_target_parts_in_order_under_their_limits(suite):
    r, calls, out = suite("plan15")
    assert r.returncode == 0, r.stdout + r.stderr
    limits = [int(c.split()[1]) for c in calls if c.startswith("TIMEOUT")]
    assert limits == [150, 30, 120, 60, 90, 90, 45]
    runs = [c for c in calls if c.startswith("PY ") and " -c " not in f" {c} "]
    assert len(runs) == 7, runs
    pytest_call, ceilings, linear, optim, conv, model, graph = runs
    assert "-m pytest" in pytest_call and "-n 8" in pytest_call and "tests/test_kernels_linear.py" in pytest_call
    assert "tests/test_optim.py" in pytest_call and "tests/test_kernels_conv.py" in pytest_call
    assert "tests/test_train.py::test_cuda_graph_training_on_a_gpu" in pytest_call  # train() with CUDA graphs
    assert "bench_ceilings.py --device cuda" in ceilings
    assert "bench_linear_gpu.py" in linear and "4096x4096x4096" in linear and "300x784x60" in linear
    assert "--densities 0.01 0.02 0.05 0.1 0.2 0.5 1" in linear and "--dtypes fp32 bf16" in linear  # targets first
    assert "bench_optim.py --device cuda --models vgg19 fc4096" in optim
    assert "vgg19/conv10-12 vgg19/conv13-16" in conv and "--directions both" in conv
    assert "--densities 0.02 0.01 0.05 0.1 0.2 0.5 1" in conv
    assert "bench_model_step.py --model vgg19" in model and "--densities 0.015 1.0" in model
    assert "bench_model_step.py --model lenet300_100" in graph and "--cuda-graph" in graph
    assert "model_step_lenet_graph_fake-h200.csv" in graph
    back = sorted(p.name for p in out.iterdir())
    assert len(back) <= 8                                    # what the device tool brings back
    assert sum(n.startswith("suite_") for n in back) == 1    # one log for the call
    assert {"ceilings_fake-h200.csv", "linear_targets_fake-h200.csv", "optim_fake-h200.csv",
            "conv_targets_fake-h200.csv", "model_step_vgg19_targets_fake-h200.csv",
            "model_step_lenet_graph_fake-h200.csv"} <= set(back)
    log = (out / next(n for n in back if n.startswith("suite_"))).read_text()
    assert log.count("=== ") == 14                           # a start and an end line per part


def test_budget_cuts_limits_and_skips_parts(suite):
    r, calls, _ = suite("plan15", budget=100)
    assert r.returncode == 0, r.stdout + r.stderr
    # each limit is its default cut to what is left of the budget less 5 s; the stand-in parts take ~0 s, but a
    # loaded machine may let a few whole seconds pass (the script counts in seconds): allow up to 5
    limits = [int(c.split()[1]) for c in calls if c.startswith("TIMEOUT")]
    assert len(limits) == 7, calls
    for got, default in zip(limits, [150, 30, 120, 60, 90, 90, 45]):
        assert min(default, 100 - 5 - 5) <= got <= min(default, 100 - 5), (limits, calls)
    r, calls, _ = suite("tests-core", "ceilings", budget=10)
    assert r.returncode == 3
    assert not any(c.startswith("TIMEOUT") for c in calls)
    assert r.stdout.count("skipped") == 2


def test_parts_outside_plan15(suite):
    r, calls, out = suite("host", "model-lenet", "train-loop")
    assert r.returncode == 0, r.stdout + r.stderr
    runs = [c for c in calls if c.startswith("PY ") and " -c " not in f" {c} "]
    assert len(runs) == 3 and "bench_host_overhead.py" in runs[0] and "host_overhead_fake-h200-host.csv" in runs[0]
    assert "bench_model_step.py --model lenet300_100" in runs[1] and "--cuda-graph" not in runs[1]
    assert "bench_train_loop.py --device cuda" in runs[2] and "train_loop_fake-h200.csv" in runs[2]
    assert [int(c.split()[1]) for c in calls if c.startswith("TIMEOUT")] == [30, 290, 60]


def test_unknown_part_and_usage(suite):
    r, _, _ = suite("no-such-part")
    assert r.returncode == 2 and "unknown part: no-such-part" in r.stdout
    r, _, _ = suite()
    assert r.returncode == 2 and "plan15" in r.stdout


def test_the_gpu_tests_build_their_triton_layers_on_the_gpu():
    """On a GPU the layer tests run with backend="triton", which a layer on the CPU refuses when it is built
    (set_mask resolves its backend: "needs CUDA tensors"): a layer built on the CPU and moved after failed there,
    and --maxfail would have stopped tests-core before its other files. The CPU suite cannot see it (its backend,
    "interpret", runs on the CPU), so every sparse layer those tests build with the kernel backend must be built on
    the kernel device (``device=``)."""
    import ast
    undeviced = []
    for name in ("test_layers_triton.py",):
        tree = ast.parse((ROOT / "tests" / name).read_text())
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("SparseLinear", "SparseConv2d"):
                kw = {k.arg: k.value for k in call.keywords}
                backend = kw.get("backend")
                if isinstance(backend, ast.Name) and backend.id in ("backend", "be") and "device" not in kw:
                    undeviced.append(f"{name}:{call.lineno}")
    assert undeviced == []

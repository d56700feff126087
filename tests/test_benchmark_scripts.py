"""The benchmark scripts run end to end on CPU, so that a session with a lent GPU does not spend it on their bugs.

bench_linear_gpu.py and bench_conv_gpu.py run with --dry-run (every implementation, op and dtype on tiny shapes, the
Triton kernels through Triton's interpreter), bench_optim.py with the Triton backend through the interpreter on its
``tiny`` parameter set, bench_model_step.py on LeNet-300-100 at batch 4 with the layers on the interpreter. Each
runs as a subprocess, the way it is run by hand; the rows it writes are checked against the combinations the
script's own constants promise. Speed is never asserted. Only the CUDA timing / memory calls stay unexercised.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DRY = "cpu-dry-run (Triton interpreter)"
TIMEOUT = 900  # seconds per script: generous, for a loaded 2-core machine


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


lin = _load("bench_linear_gpu")
conv = _load("bench_conv_gpu")
optim = _load("bench_optim")


def test_row_writer_keeps_each_row_as_it_is_measured(tmp_path, capsys):
    """bench_optim.py and bench_model_step.py write through RowWriter: every row is on disk as soon as it is
    measured, so a part that gpu_suite.sh stops at its time limit still brings back what it measured (they wrote
    their file only at the end)."""
    baselines = _load("baselines")
    out = tmp_path / "sub" / "rows.csv"
    w = baselines.RowWriter(out)
    assert not out.exists()  # nothing measured, nothing written
    w.add(dict(a=1, b="x"))
    with open(out, newline="") as f:  # before close: the row is there
        assert list(csv.DictReader(f)) == [dict(a="1", b="x")]
    w.add(dict(a=2, b="y"))
    w.close()
    with open(out, newline="") as f:
        assert [r["a"] for r in csv.DictReader(f)] == ["1", "2"]
    assert f"wrote 2 rows to {out}" in capsys.readouterr().out


def run_script(name: str, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPARSE_LTH_BACKEND", None)
    env.pop("SPARSE_LTH_COMMIT", None)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, \
        f"{name} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def read_csv(path: Path, fields: list[str]) -> list[dict]:
    assert path.exists(), f"{path} was not written"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == fields
        rows = list(reader)
    assert rows
    return rows


def assert_times(row: dict, med: str, p20: str, p80: str):
    m, lo, hi = float(row[med]), float(row[p20]), float(row[p80])
    assert all(math.isfinite(v) and v > 0 for v in (m, lo, hi)), row
    # the CSV rounds each to 6 (linear) / 5 decimals (conv) or 4 (optim): compare with slack
    assert lo <= m * 1.001 + 1e-4 and m <= hi * 1.001 + 1e-4, row


def table_lines(stdout: str, header_start: str, skip: int) -> list[str]:
    """The lines of the printed table whose header line starts with ``header_start`` (``skip`` lines after it are
    not rows), up to the first blank line."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert starts, f"no table starting {header_start!r} in stdout:\n{stdout}"
    out = []
    for line in lines[starts[-1] + 1 + skip:]:
        if not line.strip():
            break
        out.append(line)
    return out


# ----------------------------------------------------------------------------------------------------------------
# bench_linear_gpu.py --dry-run
# ----------------------------------------------------------------------------------------------------------------
def test_linear_dry_run(tmp_path):
    out = tmp_path / "linear.csv"
    # an earlier run's file: a new run writes its own (summarize.py takes a file as one run, ratios within it)
    r, c, b = lin.DRY_RUN_SHAPES[0]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=lin.FIELDS)
        w.writeheader()
        w.writerow(dict(op="fwd+bwd", shape=f"{r}x{c}", batch=b, density=lin.DRY_RUN_DENSITIES[0], dtype="fp32",
                        impl="dense_mask", median_ms=123.0, device="an earlier run"))
    proc = run_script("bench_linear_gpu.py", "--dry-run", "--out", str(out))
    rows = read_csv(out, lin.FIELDS)

    # what the script may skip on CPU: torch.sparse CSR has no bf16 matmul there (it does on CUDA). Anything else
    # skipped is a failure.
    skipped = set()
    pat = re.compile(r"^  (\S+) (?:(fwd|bwd|fwd\+bwd) )?(fp32|bf16) (\d+x\d+)x(\d+) d=(\S+)( \(all ops\))?:")
    in_skips = False
    for line in proc.stdout.splitlines():
        if line.startswith("skipped ("):
            in_skips = True
            continue
        if in_skips and line.startswith("  "):
            m = pat.match(line)
            assert m, line
            impl, op, dtype, shape, batch, d, all_ops = m.groups()
            assert (impl, dtype) == ("torch_sparse_csr", "bf16"), f"unexpected skip: {line}"
            for o in (lin.OPS if all_ops else [op]):
                skipped.add((o, shape, int(batch), float(d), dtype, impl))
        elif in_skips:
            in_skips = False
    assert "skipped" in proc.stdout  # the dry run says what it skipped, or "skipped: none"

    expected = set()
    for r, c, b in lin.DRY_RUN_SHAPES:
        for d in lin.DRY_RUN_DENSITIES:
            expected.add(("build_format", f"{r}x{c}", b, d, "bool", "build_format"))
            for dtype in lin.DTYPES:
                for impl in lin.IMPLS:
                    name = "dense_mask_autocast" if impl == "dense_mask" and dtype == "bf16" else impl
                    expected |= {(op, f"{r}x{c}", b, d, dtype, name) for op in lin.OPS}
    assert skipped <= expected
    got = [(r["op"], r["shape"], int(r["batch"]), float(r["density"]), r["dtype"], r["impl"]) for r in rows]
    assert len(got) == len(set(got))
    assert set(got) == expected - skipped
    # the Triton kernels and the bf16-autocast baseline must all have run on CPU
    assert {g[5] for g in got} >= {"sparse_triton", "dense_mask", "dense_mask_autocast", "torch_sparse_csr"}
    assert {(g[4], g[5]) for g in got} >= {("bf16", "sparse_triton"), ("fp32", "torch_sparse_csr")}
    # the layer rows name the configuration its automatic choice timed fastest; no other row names one
    labels = re.compile(r"dense|sparse(/(forward|input_grad|weight_grad):dense)*")
    for row in rows:
        if row["impl"] == "sparse_lth_layer":
            assert labels.fullmatch(row["path"]), row
        else:
            assert row["path"] == "", row

    for row in rows:
        assert_times(row, "median_ms", "p20", "p80")
        assert row["device"] == DRY
        assert row["peak_mem_bytes"] == ""  # not measured on CPU
        assert row["commit"]

    n_checks = len(lin.DRY_RUN_SHAPES) * len(lin.DRY_RUN_DENSITIES) * len(lin.DTYPES)
    assert f"correctness checks: {n_checks} run, 0 mismatching" in proc.stdout
    assert "MISMATCH" not in proc.stdout
    assert DRY in proc.stdout and "DRY RUN" in proc.stdout
    assert len(table_lines(proc.stdout, "op ", skip=1)) == len(rows)


# ----------------------------------------------------------------------------------------------------------------
# bench_conv_gpu.py --dry-run
# ----------------------------------------------------------------------------------------------------------------
CONV_VARIANTS = {  # impl -> the dtype column of its rows
    "triton_sparse": ("fp32", "bf16"),
    "dense_mask": ("fp32-tf32", "fp32-ieee"),
    "dense_mask_amp": ("bf16-autocast",),
    "unfold_csr": ("fp32",),
    "sparse_lth_layer": ("fp32-tf32", "bf16-autocast"),
}


def test_conv_dry_run(tmp_path):
    out = tmp_path / "conv.csv"
    proc = run_script("bench_conv_gpu.py", "--dry-run", "--out", str(out))
    rows = read_csv(out, conv.FIELDS)
    assert set(CONV_VARIANTS) == set(conv.IMPLS)  # a new implementation needs its row here

    layers = {lay.name: lay for lay in conv.DRY_RUN_LAYERS}
    assert len(layers) >= 2 and any(lay.stride == 2 for lay in layers.values())
    expected = {(name, d, impl, dtype, direction)
                for name in layers for d in conv.DRY_RUN_DENSITIES
                for impl, dtypes in CONV_VARIANTS.items() for dtype in dtypes for direction in conv.DIRECTIONS}
    got = [(r["layer"], float(r["density"]), r["impl"], r["dtype"], r["direction"]) for r in rows]
    assert len(got) == len(set(got))
    assert set(got) == expected

    for row in rows:
        lay = layers[row["layer"]]
        assert row["shape"] == lay.shape and int(row["batch"]) == lay.batch and int(row["count"]) == lay.count
        assert int(row["nnz"]) == round(float(row["density"]) * lay.c_out * lay.c_in * lay.k * lay.k) > 0
        assert_times(row, "median_ms", "p20_ms", "p80_ms")
        assert row["device"] == DRY
        assert row["peak_mem_bytes"] == ""
        assert row["commit"]
        if row["impl"] == "sparse_lth_layer":  # the configuration its automatic choice kept
            assert re.fullmatch(r"dense|sparse(/(forward|input_grad|weight_grad):dense)*", row["path"]), row
        else:
            assert row["path"] == "", row

    assert "FAILED" not in proc.stdout and "skipped: none" in proc.stdout
    n_checks = len(layers) * len(conv.DRY_RUN_DENSITIES)
    assert f"{n_checks} run, 0 mismatching" in proc.stdout and "WARNING" not in proc.stdout
    assert DRY in proc.stdout and "DRY RUN" in proc.stdout
    # one table line per (layer, density, direction)
    table = table_lines(proc.stdout, "layer ", skip=0)
    assert len(table) == len(layers) * len(conv.DRY_RUN_DENSITIES) * len(conv.DIRECTIONS)


# ----------------------------------------------------------------------------------------------------------------
# bench_optim.py: sparse_lth.optim's Triton kernels through the interpreter, on the tiny parameter set
# ----------------------------------------------------------------------------------------------------------------
def test_optim_interpret(tmp_path):
    out = tmp_path / "optim.csv"
    densities = [1.0, 0.1]
    proc = run_script("bench_optim.py", "--device", "cpu", "--backend", "interpret", "--models", "tiny",
                      "--densities", *map(str, densities), "--repeats", "2", "--threads", "1", "--out", str(out))
    rows = read_csv(out, optim.FIELDS)
    impls = ["torch.optim-foreach+mask", "torch.optim-fused+mask", "torch.optim-foreach+boolmask",
             "torch.optim-fused+boolmask", "sparse_lth-interpret-dense",
             "sparse_lth-interpret-compact", "torch.optim-fused-compact"]
    expected = {(op, "tiny", d, impl) for op in optim.OPS for d in densities for impl in impls}
    got = [(r["op"], r["model"], float(r["density"]), r["impl"]) for r in rows]
    assert len(got) == len(set(got)) and set(got) == expected
    n_params = sum(math.prod(shape) for shape, _ in optim.model_shapes("tiny"))
    for row in rows:
        assert_times(row, "median_ms", "p20_ms", "p80_ms")
        assert int(row["params"]) == n_params and 0 < int(row["nnz"]) <= n_params and int(row["bytes"]) > 0
        assert row["device"].startswith("cpu: ") and row["device"].endswith(" (1 threads)")
        assert row["dtype"] == "float32"
    assert f"wrote {len(rows)} rows" in proc.stdout
    assert sum(" tiny " in line and " ms " in line for line in proc.stdout.splitlines()) == len(rows)


def test_optim_refusals(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as e:
        optim.main(["--device", "cpu", "--backend", "interpret", "--models", "tiny"])
    assert e.value.code != 0 and "TRITON_INTERPRET=1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# bench_model_step.py: LeNet-300-100 at batch 4, the sparse layers and optimizer on the interpreter
# ----------------------------------------------------------------------------------------------------------------
def test_model_step_smoke(tmp_path):
    out = tmp_path / "model_step.csv"
    densities = [1.0, 0.1]
    proc = run_script("bench_model_step.py", "--model", "lenet300_100", "--batch", "4", "--device", "cpu",
                      "--densities", *map(str, densities), "--repeats", "1", "--warmup", "0", "--threads", "1",
                      "--out", str(out), SPARSE_LTH_BACKEND="interpret")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(float(r["density"]), r["impl"]) for r in rows} == {
        (d, impl) for d in densities for impl in ("dense_masking", "sparse_lth", "sparse_lth_optim")}
    assert len(rows) == 6
    for row in rows:
        assert math.isfinite(float(row["median_ms"])) and float(row["median_ms"]) > 0
        assert row["model"] == "lenet300_100" and row["batch"] == "4" and row["device"].startswith("cpu")
        if row["impl"] == "dense_masking":
            assert row["paths"] == "-" and float(row["speedup_vs_dense_masking"]) == 1.0
        else:
            assert re.fullmatch(r"[ds]+", row["paths"]), row
    # density 0.1 puts the hidden layers on the sparse path (the Triton kernels, here interpreted)
    assert any(r["paths"].startswith("s") for r in rows if float(r["density"]) == 0.1)
    assert f"wrote 6 rows to {out}" in proc.stdout


def test_model_step_cuda_graph_stand_in(tmp_path):
    """--cuda-graph without CUDA: the graph rows are the eager step (a stand-in, labelled so), each checked against
    its eager twin (a deep copy taking the same steps: here bitwise the same), the graph rows' speedups against
    dense_masking_graph. On a GPU the same code captures and replays a CUDA graph (gpu_suite.sh's
    model-lenet-graph part)."""
    out = tmp_path / "model_step_graph.csv"
    run_script("bench_model_step.py", "--model", "lenet300_100", "--batch", "4", "--device", "cpu",
               "--densities", "0.1", "--repeats", "1", "--warmup", "1", "--threads", "1", "--cuda-graph",
               "--check-steps", "2", "--out", str(out), SPARSE_LTH_BACKEND="interpret")
    with open(out, newline="") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense_masking", "sparse_lth", "sparse_lth_optim", "dense_masking_graph", "sparse_lth_graph",
                         "sparse_lth_optim_graph"}
    for impl in ("dense_masking_graph", "sparse_lth_graph", "sparse_lth_optim_graph"):
        assert rows[impl]["graph"] == "stand-in" and float(rows[impl]["graph_check"]) == 0.0
    for impl in ("dense_masking", "sparse_lth", "sparse_lth_optim"):
        assert rows[impl]["graph"] == "-" and rows[impl]["graph_check"] == "-"
    assert float(rows["dense_masking_graph"]["speedup_vs_dense_masking"]) == 1.0
    g, b = float(rows["sparse_lth_graph"]["median_ms"]), float(rows["dense_masking_graph"]["median_ms"])
    # (the file rounds the speedup to 3 decimals and the times to 4)
    assert float(rows["sparse_lth_graph"]["speedup_vs_dense_masking"]) == pytest.approx(b / g, rel=1e-2, abs=1e-3)
    assert rows["sparse_lth_graph"]["paths"] == rows["sparse_lth"]["paths"] and "s" in rows["sparse_lth"]["paths"]


def test_model_step_a_failed_capture_costs_only_its_row(tmp_path, monkeypatch, capsys):
    """A graph whose capture raises (on a GPU: a capture error) is reported and left out; the other rows are kept."""
    mod = _load("bench_model_step")
    real = mod.graph_and_twin

    def failing(model, factory, *args):
        if factory.__name__ == "capturable_sl":
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(model, factory, *args)

    monkeypatch.setattr(mod, "graph_and_twin", failing)
    monkeypatch.setenv("SPARSE_LTH_BACKEND", "interpret")
    out = tmp_path / "graph.csv"
    assert mod.main(["--model", "lenet300_100", "--batch", "2", "--device", "cpu", "--densities", "0.1",
                     "--repeats", "1", "--warmup", "1", "--check-steps", "1", "--cuda-graph", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        impls = {r["impl"] for r in csv.DictReader(f)}
    assert impls == {"dense_masking", "sparse_lth", "sparse_lth_optim", "dense_masking_graph", "sparse_lth_graph"}
    assert "sparse_lth_optim_graph: capture failed: operation not permitted" in capsys.readouterr().err


def test_train_loop_benchmark_times_both_modes(tmp_path):
    """bench_train_loop.py on the CPU (a check of the script: there is no device to wait for): train() timed with
    and without a wait after every step, each mode's rows with train()'s own ms per step."""
    out = tmp_path / "train_loop.csv"
    proc = run_script("bench_train_loop.py", "--device", "cpu", "--densities", "0.05", "--iterations", "3",
                      "--repeats", "2", "--optimizer-impl", "torch", "sparse_lth", "--threads", "1", "--out", str(out))
    rows = read_csv(out, ["model", "batch", "iterations", "device", "commit", "torch", "density", "optimizer_impl",
                          "paths", "mode", "median_ms_per_step", "min_ms", "max_ms", "repeats",
                          "speedup_vs_per_step_sync"])
    assert [(r["optimizer_impl"], r["mode"]) for r in rows] == [
        ("torch", "per_step_sync"), ("torch", "stretch"), ("sparse_lth", "per_step_sync"), ("sparse_lth", "stretch")]
    for r in rows:
        assert r["device"].startswith("cpu") and r["iterations"] == "3" and r["repeats"] == "2"
        assert 0 < float(r["min_ms"]) <= float(r["median_ms_per_step"]) <= float(r["max_ms"])
        assert len(r["paths"]) == 3 and set(r["paths"]) <= set("dsh")
        if r["mode"] == "per_step_sync":
            assert float(r["speedup_vs_per_step_sync"]) == 1.0
    assert f"wrote {out}" in proc.stdout


def test_model_step_cuda_graph_needs_a_warmup():
    with pytest.raises(SystemExit) as e:
        _load("bench_model_step").main(["--device", "cpu", "--cuda-graph", "--warmup", "0"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------------
# refusals and defaults (in-process: no kernels run)
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# bench_memory.py: LeNet-300-100 and a small slice of ResNet-20's work, the counts checked against the layer sizes
# ----------------------------------------------------------------------------------------------------------------
def test_memory_benchmark_counts_every_storage_once(tmp_path):
    out = tmp_path / "memory.csv"
    proc = run_script("bench_memory.py", "--models", "lenet300_100", "--densities", "1", "0.05", "--threads", "1",
                      "--out", str(out))
    with open(out, newline="") as f:
        rows = {(float(r["density"]), r["impl"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(d, i) for d in (1.0, 0.05) for i in ("dense_masking", "sparse_lth", "sparse_lth_sparse")}
    fc1, fc2, fc3, biases = 784 * 300, 300 * 100, 100 * 10, 300 + 100 + 10
    nnz = round(0.05 * fc1) + round(0.05 * fc2)  # exact live counts; the output layer is not pruned
    def counts(row):
        return {k: int(v) for k, v in row.items() if k.endswith("_bytes") and v != ""}

    b = counts(rows[(0.05, "dense_masking")])
    assert b["params_bytes"] == b["grads_bytes"] == 4 * (fc1 + fc2 + fc3 + biases)
    assert b["optim_bytes"] >= 2 * b["params_bytes"]  # Adam's two moments (and its step counts)
    assert b["masks_index_bytes"] == 4 * (fc1 + fc2)  # the baseline's float masks
    assert b["saved_bytes"] >= 4 * fc2  # weight * mask, for the input gradient of the layers after the first
    s = counts(rows[(0.05, "sparse_lth")])
    assert rows[(0.05, "sparse_lth")]["paths"] == "ssd" and int(rows[(0.05, "sparse_lth")]["nnz"]) == nnz
    assert s["params_bytes"] == s["grads_bytes"] == 4 * (nnz + fc3 + biases)  # the compact values only
    assert s["masks_index_bytes"] >= fc1 + fc2 + fc3  # bool masks, one byte per weight, and the index structures
    for r in rows.values():
        v = counts(r)
        assert v["state_bytes"] == v["params_bytes"] + v["grads_bytes"] + v["optim_bytes"] + v["masks_index_bytes"]
        assert v["total_bytes"] == v["state_bytes"] + v["saved_bytes"] and r["peak_bytes"] == ""
        base = int(rows[(float(r["density"]), "dense_masking")]["state_bytes"])
        assert float(r["state_x"]) == pytest.approx(base / v["state_bytes"], rel=1e-3)
    dense = counts(rows[(1.0, "sparse_lth")])
    assert rows[(1.0, "sparse_lth")]["paths"] == "ddd" and dense["params_bytes"] == b["params_bytes"]
    # everything sparse_lth.optim holds: Adam's two moments, 6 step counts, and (CPU, torch backend) each masked
    # weight's mask as int32 bits, 4 bytes a weight (it went uncounted: only opt.state was)
    assert dense["optim_bytes"] == 2 * 4 * (fc1 + fc2 + fc3 + biases) + 6 * 4 + 4 * (fc1 + fc2 + fc3)
    md = out.with_suffix(".md").read_text()
    assert "## lenet300_100, batch 60, adam" in md and md.count("| 0.05 |") == 3
    assert f"wrote {out}" in proc.stdout
    out.with_suffix(".md").unlink()  # the table again from the CSV alone (what comes back from a GPU run)
    run_script("bench_memory.py", "--table", str(out))
    assert out.with_suffix(".md").read_text() == md


def test_memory_benchmark_refuses_bad_arguments(capsys):
    mem = _load("bench_memory")
    with pytest.raises(SystemExit):
        mem.main(["--densities", "0"])
    assert "densities must be in (0, 1]" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert mem.main(["--device", "cuda"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err


def test_linear_benchmark_stopped_by_sigterm_exits_through_python(tmp_path):
    """gpu_suite.sh stops a part at its time limit with timeout(1)'s SIGTERM: bench_linear_gpu.py turns it into an
    exit (status 143), so its atexit handler runs, which writes the variant timings measured so far (they were
    written only at the end, and lost when a part was cut). Its rows are on disk already (flushed per row)."""
    import signal
    import time
    out = tmp_path / "lin.csv"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(BENCH / "bench_linear_gpu.py"), "--dry-run", "--shapes",
                             "64x64x8", "96x64x8", "--densities", "0.5", "0.3", "0.2", "0.1", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # wait until it measures
        seen.append(line)
        if line.startswith("results -> "):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest  # a Python exit (killed: -15)


def test_gpu_scripts_refuse_without_gpu(monkeypatch, capsys):
    # TRITON_INTERPRET=1 makes both refuse on any machine, a GPU one included (here: no GPU either)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lin.main([]) == 2
    assert "Nothing was run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        conv.main([])
    assert isinstance(e.value.code, str)  # sys.exit(message): exit status 1, the message on stderr
    assert "no CUDA device" in e.value.code or "TRITON_INTERPRET is set" in e.value.code


def test_dry_run_needs_interpreter_from_environment(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert lin.main(["--dry-run"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        conv.main(["--dry-run"])
    assert isinstance(e.value.code, str) and "TRITON_INTERPRET=1" in e.value.code


def test_dry_run_default_output_is_not_under_results(monkeypatch, tmp_path, capsys, kernel_device):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the dry runs' temporary folders go
    # linear, dense masking only: no Triton kernel runs in this process
    assert lin.main(["--dry-run", "--shapes", "7x13x5", "--densities", "1", "--impls", "dense_mask", "--dtypes",
                     "fp32", "--ops", "fwd", "--no-build-format"]) == 0
    written = list(tmp_path.glob("sparse_lth_dry_run_*/linear_dry_run.csv"))
    assert len(written) == 1 and DRY in written[0].read_text()
    assert f"results -> {written[0]}" in capsys.readouterr().out
    if kernel_device.type != "cpu":  # conv's correctness check runs a kernel: only where this process interprets
        return
    conv.main(["--dry-run", "--layers", "dry/conv", "--densities", "1", "--impls", "dense_mask", "--directions",
               "forward"])
    written = list(tmp_path.glob("sparse_lth_dry_run_*/conv_dry_run.csv"))
    assert len(written) == 1 and DRY in written[0].read_text()
    assert f"rows written to {written[0]}" in capsys.readouterr().out
    for path in tmp_path.glob("sparse_lth_dry_run_*/*.csv"):
        assert BENCH / "results" not in path.parents


# ------------------------------------------------------------------------------------------------ bench_ceilings.py
def test_bench_ceilings_cpu(tmp_path):
    out = tmp_path / "ceilings.csv"
    proc = run_script("bench_ceilings.py", "--device", "cpu", "--copy-mib", "4", "--matmul-n", "64",
                      "--repeats", "3", "--threads", "1", "--out", str(out))
    rows = read_csv(out, _load("bench_ceilings").FIELDS)
    assert [(r["kind"], r["dtype"]) for r in rows] == [("copy", "float32"), ("matmul", "float32")]  # no TF32/bf16 on CPU
    for r in rows:
        assert r["device"].startswith("cpu") and math.isfinite(float(r["rate"])) and float(r["rate"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
    assert "GB/s" in proc.stdout and "TFLOP/s" in proc.stdout


def test_bench_ceilings_refuses_cuda_without_gpu(tmp_path):
    if _torch_cuda():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_ceilings.py"), "--device", "cuda", "--out",
                           str(tmp_path / "x.csv")], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.csv").exists()


def _torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# the CPU benchmarks (run for real, on small settings: the rows are checked, not the speed)
# ----------------------------------------------------------------------------------------------------------------
def run_cpu_benchmark(script: str, out: Path, *args: str, repeats: int = 2) -> list[dict]:
    proc = run_script(script, *args, "--repeats", str(repeats), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_linear_ops_cpu_benchmark_writes_every_op_both_ways(tmp_path):
    rows = run_cpu_benchmark("bench_linear_ops_cpu.py", tmp_path / "ops.csv", "--densities", "0.1")
    ops = _load("bench_linear_ops_cpu")
    got = {(r["shape"], r["op"], r["impl"]) for r in rows}
    assert got == {(f"{r}x{c}", op, impl) for r, c, _ in ops.SHAPES
                   for op in ("forward", "input_grad", "weight_grad") for impl in ("sparse", "dense")}
    assert len(rows) == len(got) and all(float(r["median_ms"]) > 0 for r in rows)


def test_adam_zeros_cpu_benchmark_end_to_end(tmp_path):
    rows = run_cpu_benchmark("bench_adam_zeros_cpu.py", tmp_path / "az.csv", "--densities", "0.2", "--inner", "1",
                             repeats=1)
    assert {(r["part"], r["impl"]) for r in rows} == (
        {("sqrt", k) for k in ("uniform", "zeros", "zeros_80pct")}
        | {("adam_step", k) for k in ("torch_default", "torch_foreach", "torch_fused", "sparse_lth")})
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert "| 0.2 |" in (tmp_path / "az.md").read_text()


def test_layers_cpu_benchmark_times_the_timed_choice(tmp_path):
    out = tmp_path / "layers.csv"
    rows = run_cpu_benchmark("bench_layers_cpu.py", out, "--densities", "0.05", repeats=1)  # one repeat: its own
    impls = {"dense_masking", "sparse_lth_auto", "sparse_lth_timed", "sparse_lth_dense", "sparse_lth_sparse"}
    # a training step's timed choice is also run timing the forward and backward only (its optimizer left out), and
    # the step with other optimizers
    assert {(r["case"], r["impl"]) for r in rows} == (
        {(c, i) for c in ("lenet300_100_train_step_b60", "linear1024_fwd_bwd_b256") for i in impls}
        | {("lenet300_100_train_step_b60", i) for i in ("sparse_lth_timed_fwd_bwd", "dense_masking_fused_adam",
                                                        "sparse_lth_auto_fused_adam",
                                                        "sparse_lth_auto_mask_aware_adam")})
    for r in rows:
        assert float(r["median_ms"]) > 0
        if r["case"].startswith("lenet") and not r["impl"].startswith("dense_masking"):
            assert re.fullmatch(r"[dsh]/[dsh]/[dsh]", r["path"]), r
    md = out.with_suffix(".md").read_text()
    assert "| timed ms (path) |" in md and "| timed fwd+bwd ms (path) |" in md
    assert md.count("| lenet300_100_train_step_b60 | 0.05 |") == 2  # (the second: with other optimizers)
    # the table's speedups are the CSV's medians divided, rounded once
    med = {(r["case"], r["impl"]): float(r["median_ms"]) for r in rows}
    for case in ("lenet300_100_train_step_b60", "linear1024_fwd_bwd_b256"):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {case} | 0.05 |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        base = med[(case, "dense_masking")]
        assert cells[4] == f"{base / med[(case, 'sparse_lth_auto')]:.2f}x", line
        assert cells[6] == f"{base / med[(case, 'sparse_lth_timed')]:.2f}x", line
        fb = med.get((case, "sparse_lth_timed_fwd_bwd"))
        assert cells[8] == (f"{base / fb:.2f}x" if fb else "-"), line
        assert (fb is None) == case.startswith("linear")
        assert cells[10] == f"{base / med[(case, 'sparse_lth_sparse')]:.2f}x", line
    # the second table: the LeNet step with other optimizers, against dense masking with torch's fused Adam
    case = "lenet300_100_train_step_b60"
    (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {case} | 0.05 |")
               and ln.count("|") == 9]
    cells = [c.strip() for c in line.strip("|").split("|")]
    fused = med[(case, "dense_masking_fused_adam")]
    assert cells[2] == f"{med[(case, 'dense_masking')]:.3f}" and cells[3] == f"{fused:.3f}", line
    assert cells[5] == f"{fused / med[(case, 'sparse_lth_auto_fused_adam')]:.2f}x", line
    assert cells[7] == f"{fused / med[(case, 'sparse_lth_auto_mask_aware_adam')]:.2f}x", line


def test_layers_cpu_benchmark_conv6_step(tmp_path):
    out = tmp_path / "layers_conv6.csv"
    rows = run_cpu_benchmark("bench_layers_cpu.py", out, "--cases", "conv6", "--densities", "0.02")
    impls = {"dense_masking", "sparse_lth_auto", "sparse_lth_timed", "sparse_lth_timed_fwd_bwd", "sparse_lth_dense",
             "sparse_lth_sparse"}
    assert {(r["case"], r["impl"]) for r in rows} == {("conv6_train_step_b60", i) for i in impls}
    paths = {r["impl"]: r["path"] for r in rows}
    # 6 conv + 3 linear layers; at 2 % the CPU rule puts conv 2-6 and every linear layer on the sparse path
    assert paths["sparse_lth_auto"] == "d/s/s/s/s/s/s/s/s" and paths["sparse_lth_dense"] == "/".join("d" * 9)
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_crossover_cpu_benchmark_times_every_configuration(tmp_path):
    out = tmp_path / "crossover.csv"
    rows = run_cpu_benchmark("bench_crossover_cpu.py", out, "--shapes", "100x300x60", "--densities", "0.3", "0.05")
    cross = _load("bench_crossover_cpu")
    assert {(r["shape"], float(r["density"]), r["config"]) for r in rows} == \
        {("100x300", d, c) for d in (0.3, 0.05) for c in cross.CONFIGS}
    assert len(rows) == 2 * len(cross.CONFIGS)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["speedup_vs_dense_path"]) > 0
        assert (r["config"] != "dense") or float(r["speedup_vs_dense_path"]) == 1.0
    md = out.with_suffix(".md").read_text()
    assert md.count("| 100x300 | 60 |") == 2 and "- 100x300 at batch 60: the all-sparse path wins" in md


def test_crossover_cpu_benchmark_takes_any_linear_shape(tmp_path):
    """--shapes OUTxINxBATCH beyond the default four (the small layers of
    crossover_small_linear_cpu_*): timed as they are, each row naming its shape and batch."""
    out = tmp_path / "crossover.csv"
    rows = run_cpu_benchmark("bench_crossover_cpu.py", out, "--shapes", "30x20x4", "--densities", "0.1")
    assert {(r["shape"], r["batch"], float(r["density"])) for r in rows} == {("30x20", "4", 0.1)}
    assert "| 30x20 | 4 | 0.1 |" in out.with_suffix(".md").read_text()


def test_crossover_cpu_benchmark_conv_layers(tmp_path):
    """--kind conv: a first layer (no input gradient) and a strided layer, every configuration, real timings."""
    out = tmp_path / "crossover_conv.csv"
    rows = run_cpu_benchmark("bench_crossover_cpu.py", out, "--kind", "conv", "--shapes", "conv6.1",
                             "resnet20.16-32s2", "--densities", "0.05")
    cross = _load("bench_crossover_cpu")
    shapes = {"conv6.1 3->64 32x32", "resnet20.16-32s2 16->32 32x32 s2"}
    assert {(r["shape"], r["config"]) for r in rows} == {(s, c) for s in shapes for c in cross.CONV_CONFIGS}
    assert {r["batch"] for r in rows} == {"60", "128"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "SparseConv2d" in md and "--kind conv" in md and md.count("| conv6.1 3->64 32x32 | 60 | 0.05 |") == 1
    assert "--shapes conv6.1 resnet20.16-32s2 --densities 0.05" in md  # the command as given, not only --kind


def test_crossover_is_the_top_of_the_winning_run_from_the_lowest_density():
    cross = _load("bench_crossover_cpu").crossover
    assert cross({0.05: 3.0, 0.1: 2.0, 0.2: 1.2, 0.3: 0.9, 0.5: 1.1}) == 0.2  # a noisy win above a loss: ignored
    assert cross({0.05: 0.9, 0.1: 1.5}) is None
    assert cross({0.05: 1.5, 0.5: 1.01}) == 0.5


@pytest.mark.parametrize("args,message", [(["--shapes", "7x7"], "unknown shape"), (["--shapes", "0x7x7"], "unknown shape"), (["--densities", "1.0"], "(0, 1)"),
                                          (["--kind", "conv", "--shapes", "100x300x60"], "unknown shape")])
def test_crossover_cpu_refuses_bad_arguments(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        _load("bench_crossover_cpu").main([*args, "--out", str(tmp_path / "x.csv")])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


def test_interleaved_samples_draws_a_new_order_every_round():
    """The CPU benchmarks' interleaver: warm-up calls untimed, every function timed once per round, and the
    order changes between rounds so that no function always runs after the same neighbour."""
    base = _load("baselines")
    log = []
    fns = {k: (lambda k=k: log.append(k)) for k in "abcd"}
    timed = []

    def time_one(fn):
        fn()
        timed.append(log[-1])
        return float(len(timed))

    samples = base.interleaved_samples(fns, repeats=12, time_one=time_one, warmup=2)
    assert log[:8] == list("aabbccdd") and len(log) == 8 + 4 * 12
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert all(len(samples[k]) == 12 for k in "abcd")
    assert sorted(x for xs in samples.values() for x in xs) == [float(i) for i in range(1, 49)]
    predecessors = {k: {r[r.index(k) - 1] for r in rounds if r.index(k) > 0} for k in "abcd"}
    assert all(len(p) >= 2 for p in predecessors.values())


# ----------------------------------------------------------------------------------------------------------------
# bench_host_overhead.py: sparse-lth's host time per step with the kernel launches stubbed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizers", [["torch_sgd"], ["sparse_lth_adam", "sparse_lth_adam_capturable"],
                                        ["torch_sgd_fused", "torch_adam_fused", "sparse_lth_sgd"]])
def test_host_overhead_benchmark_counts_the_launches(tmp_path, optimizers):
    out = tmp_path / "host.csv"
    proc = run_script("bench_host_overhead.py", "--densities", "0.5", "0.02", "--repeats", "5", "--optimizer",
                      *optimizers, "--out", str(out))
    rows = read_csv(out, ["model", "density", "batch", "optimizer", "step_us", "floor_us", "opt_us", "launches_fwd",
                          "launches_bwd", "host_us_per_launch", "device", "torch", "commit"])
    # one row per optimizer and density, in that order
    assert [(r["optimizer"], float(r["density"])) for r in rows] == [(o, d) for o in optimizers for d in (0.5, 0.02)]
    for r in rows:
        # LeNet-300-100 on the sparse path: one launch per layer forward; backward, the weight gradient of all
        # three and the input gradient of the two whose input needs one (the image does not)
        assert (int(r["launches_fwd"]), int(r["launches_bwd"])) == (3, 5), r
        assert float(r["step_us"]) > 0 and float(r["floor_us"]) > 0, r
        # the optimizer's step is part of the step
        assert 0 < float(r["opt_us"]) < float(r["step_us"]), r
        assert r["device"].startswith("cpu: ") and r["model"] == "lenet300_100"
    assert "kernel launches stubbed" in proc.stdout


def test_host_overhead_benchmark_on_a_conv_model(tmp_path):
    """Conv-2 on CIFAR-shaped inputs: its sparse convs and linears are stubbed and floored alike."""
    out = tmp_path / "host.csv"
    run_script("bench_host_overhead.py", "--model", "conv2", "--batch", "2", "--densities", "0.05", "--repeats", "5",
               "--optimizer", "sparse_lth_sgd", "--out", str(out))
    (r,) = read_csv(out, ["model", "density", "batch", "optimizer", "step_us", "floor_us", "opt_us", "launches_fwd",
                          "launches_bwd", "host_us_per_launch", "device", "torch", "commit"])
    assert (r["model"], r["batch"], r["optimizer"]) == ("conv2", "2", "sparse_lth_sgd")
    # forward: 2 convs + 3 linears; backward: the first conv's weight gradient only (its input is the image), the
    # second's input and weight gradients, and both for each linear
    assert (int(r["launches_fwd"]), int(r["launches_bwd"])) == (5, 9), r
    assert 0 < float(r["opt_us"]) < float(r["step_us"]) and float(r["floor_us"]) > 0, r


@pytest.mark.parametrize("args", [["--densities", "0"], ["--repeats", "0"]])
def test_host_overhead_benchmark_refuses_bad_arguments(args, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_host_overhead.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "must" in proc.stderr


def test_the_cpu_benchmarks_masks_have_exact_live_counts():
    """Every CPU benchmark draws masks of exactly round(density * numel) live weights, as IMP's are: a Bernoulli
    draw lands either side of a path rule's cutoff (the crossover, per-op and layer benchmarks drew them)."""
    base = _load("baselines")
    gen = torch.Generator().manual_seed(0)
    for shape, d in (((300, 784), 0.1), ((1024, 1024), 0.05), ((64, 32, 3, 3), 0.02), ((7, 13), 0.0)):
        m = base.exact_mask(shape, d, gen)
        assert m.dtype == torch.bool and m.shape == shape and int(m.sum()) == round(d * m.numel())
    ops = _load("bench_linear_ops_cpu")
    cross = _load("bench_crossover_cpu")
    with torch.no_grad():
        for make in (lambda: ops.ops_for(300, 784, 4, 0.1, torch.Generator().manual_seed(1)),
                     lambda: cross.step_fns(300, 784, 4, 0.1, torch.Generator().manual_seed(1))):
            seen = []
            real = base.exact_mask
            try:  # the scripts take their masks from exact_mask
                for mod in (ops, cross):
                    mod.exact_mask = lambda *a, **k: seen.append(a) or real(*a, **k)
                make()
            finally:
                ops.exact_mask = cross.exact_mask = real
            assert seen and seen[0][:2] == ((300, 784), 0.1)


def test_ab_train_cpu_alternates_two_checkouts_and_compares_what_they_trained(tmp_path):
    """benchmarks/ab_train_cpu.py on this checkout against itself (a few steps: the rows, not the speed): every
    run recorded, the arms alternated, and the two networks found identical."""
    from conftest import require_shared_data
    out = tmp_path / "ab.csv"
    proc = run_script("ab_train_cpu.py", "--a", str(ROOT), "--b", str(ROOT), "--data", str(require_shared_data()),
                      "--iterations", "4", "--repeats", "2", "--densities", "0.05", "--out", str(out))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["repeat"], r["arm"]) for r in rows] == [("0", "a"), ("0", "b"), ("1", "b"), ("1", "a")]
    assert all(float(r["us_per_step"]) > 0 and r["commit"] and r["density"] == "0.05" for r in rows)
    assert "density 0.05: A " in proc.stdout and "trained networks identical" in proc.stdout

"""The support modules' wiring: the run-folder lock (runlock), the environment record (environment), atomic writes
(_files), the presets against the paper's table, the backend choice (backend) and the plain-PyTorch linear ops
(kernels.torch_ops)."""
import dataclasses
import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import sparse_lth.backend as backend_mod
import sparse_lth.runlock as runlock
from sparse_lth import environment as envmod
from sparse_lth._files import TEMPORARY, read_json, write_atomic
from sparse_lth.backend import resolve_backend
from sparse_lth.kernels import torch_ops
from sparse_lth.kernels.format import build_format
from sparse_lth.models import paper_hparams
from sparse_lth.presets import PRESET_NAMES, get_preset
from sparse_lth.runlock import LOCK_NAME, RunInProgressError, hold, lock_state
from test_layers import random_mask


# --------------------------------------------------------------------------------------------------------------
# runlock
# --------------------------------------------------------------------------------------------------------------
def _lock_file(seed_dir):
    with hold(seed_dir):
        pass
    return os.path.join(seed_dir, LOCK_NAME)


def test_a_listing_holding_a_shared_lock_does_not_make_a_stopped_run_look_running(tmp_path):
    """lock_state reads with a shared lock: another reader's shared lock (a concurrent `sparse-lth ls`) leaves a
    stopped run "stopped", not "running"."""
    d = str(tmp_path / "seed_0")
    fd = os.open(_lock_file(d), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert lock_state(d)["state"] == "stopped"
    finally:
        os.close(fd)


def test_hold_waits_out_a_listings_brief_shared_lock(tmp_path):
    """hold(patience=...) keeps trying while a listing holds its shared lock for an instant, then takes the lock,
    instead of refusing the run at the first try."""
    d = str(tmp_path / "seed_0")
    fd = os.open(_lock_file(d), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(0.3, os.close, (fd,))
    timer.start()
    try:
        with hold(d, patience=5.0):
            assert lock_state(d)["pid"] == os.getpid()
    finally:
        timer.join()


def test_a_new_holder_replaces_a_longer_record_whole(tmp_path):
    """The holder's record replaces the previous one whole (truncated first): a shorter record over a longer one
    (another host, a longer command) still reads back as this process's."""
    d = tmp_path / "seed_0"
    d.mkdir()
    (d / LOCK_NAME).write_text(json.dumps(dict(pid=1, host="h" * 200, since="then", command="x" * 2000)))
    with hold(str(d)):
        state = lock_state(str(d))
        assert state["state"] == "running" and state["pid"] == os.getpid() and state["host"] != "h" * 200


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"pid": 12', b"\xff\xfe", b""])
def test_a_damaged_or_foreign_lock_record_reads_as_no_holder(tmp_path, content):
    """A lock file that is not a JSON object (half written, another tool's) gives a state without a holder, never
    an exception in `sparse-lth ls`."""
    d = tmp_path / "seed_0"
    d.mkdir()
    (d / LOCK_NAME).write_bytes(content)
    assert lock_state(str(d)) == dict(state="stopped", pid=None, host=None, since=None, command=None)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS])
def test_every_no_locks_errno_warns_and_runs(monkeypatch, tmp_path, code):
    """Each errno by which a filesystem says it cannot lock (NFS, FUSE, ...) lets the run go on with a warning."""
    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="this filesystem does not lock"):
        with hold(str(tmp_path / "seed_0")):
            pass


def test_other_lock_errors_are_raised_not_taken_for_a_filesystem_without_locks(monkeypatch, tmp_path):
    """An I/O error while locking is raised: only the 'cannot lock here' errnos mean run unlocked."""
    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(runlock.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        with hold(str(tmp_path / "seed_0")):
            pass


def test_a_running_state_reads_without_its_command():
    """describe(): "running: pid ... on host since ..." (the command is left to the listing's own columns);
    "stopped"; None for unknown."""
    state = dict(state="running", pid=5, host="node1", since="2026-01-01 00:00:00 UTC", command="sparse-lth imp")
    assert runlock.describe(state) == "running: pid 5 on node1 since 2026-01-01 00:00:00 UTC"
    assert runlock.describe({**state, "state": "stopped"}) == "stopped"
    assert runlock.describe(dict(state="unknown")) is None


def test_a_console_script_is_recorded_by_its_name(monkeypatch, tmp_path):
    """The holder's command: a console entry point run by the interpreter is named by the script
    ("sparse-lth imp ..."), an interpreter's own flags keep the interpreter's base name."""
    script = tmp_path / "sparse-lth"
    script.write_text("")
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", str(script), "imp", "--preset", "lenet_quick"])
    assert runlock._command() == "sparse-lth imp --preset lenet_quick"
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "-m", "pytest", "-q"])
    assert runlock._command() == "python3 -m pytest -q"


# --------------------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------------------
CPUINFO = """processor\t: 0
model name\t: Big Core CPU
cpu family\t: 25
model\t\t: 17

processor\t: 1
model name\t: Little Core CPU
cpu family\t: 6
model\t\t: 85
"""


class _FakeFile:
    def __init__(self, path):
        self.path = path

    def read_text(self):
        assert str(self.path) == "/proc/cpuinfo"
        return CPUINFO


def test_cpu_id_is_the_first_processors_name_family_and_model(monkeypatch):
    """cpu_id(): the first processor block's name with its family and model numbers (hosts with the same name
    differ in instruction set), not a later block's."""
    monkeypatch.setattr(envmod, "Path", _FakeFile)
    assert envmod.cpu_id() == "Big Core CPU (family 25, model 17)"


def test_a_blank_commit_override_is_no_override(monkeypatch):
    """$SPARSE_LTH_COMMIT set to blanks falls back to the checkout's commit."""
    monkeypatch.setenv("SPARSE_LTH_COMMIT", "   ")
    assert envmod.git_commit() == envmod._checkout_commit()
    assert envmod.git_commit().strip()


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """A git repository holding a sparse_lth/ package and run outputs, as environment's source checkout."""
    repo = tmp_path / "repo"
    for rel in ("sparse_lth/environment.py", "results/lenet/a.json", "benchmarks/results/b.json"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("0\n")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    monkeypatch.delenv("SPARSE_LTH_COMMIT", raising=False)
    envmod._checkout_commit.cache_clear()
    yield repo, git("rev-parse", "--short=12", "HEAD")
    envmod._checkout_commit.cache_clear()  # (monkeypatch restores __file__ after this: the real checkout's next)


def test_the_commit_is_dirty_for_code_only_and_asked_once(fake_checkout, monkeypatch):
    """git_commit(): the checkout's HEAD, "-dirty" for a changed tracked file outside results/ and
    benchmarks/results/ (untracked files and run outputs do not count), asked once per process."""
    repo, sha = fake_checkout
    monkeypatch.setattr(envmod, "__file__", str(repo / "sparse_lth" / "environment.py"))
    (repo / "notes.txt").write_text("untracked")
    (repo / "results" / "lenet" / "a.json").write_text("1\n")
    (repo / "benchmarks" / "results" / "b.json").write_text("1\n")
    assert envmod.git_commit() == sha
    (repo / "sparse_lth" / "environment.py").write_text("1\n")
    assert envmod.git_commit() == sha  # the code imported is the code that runs
    envmod._checkout_commit.cache_clear()
    assert envmod.git_commit() == sha + "-dirty"


def test_an_installed_copy_inside_another_repository_has_no_commit(fake_checkout, monkeypatch):
    """A package without its own .git (installed into a venv that lives in some git repository) is "unknown",
    not the surrounding repository's commit."""
    repo, _ = fake_checkout
    pkg = repo / "site-packages" / "sparse_lth"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(envmod, "__file__", str(pkg / "environment.py"))
    assert envmod.git_commit() == "unknown"


def test_the_record_names_the_python_version_and_other_devices():
    """environment() records the Python version, and the device type for a device that is neither CPU nor
    CUDA."""
    assert envmod.environment("cpu")["python"] == platform.python_version()
    assert envmod.environment("meta")["device"] == "meta"


def test_a_cuda_record_names_its_device_tf32_and_triton(monkeypatch):
    """A CUDA run records the named device's name (cuda:1's, not the current one's), both TF32 switches and the
    Triton version, and they count as numerics."""
    import triton
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    env = envmod.environment("cuda:1")
    assert env["device"] == "Fake GPU 1"
    assert env["tf32_matmul"] == torch.backends.cuda.matmul.allow_tf32
    assert env["tf32_cudnn"] == torch.backends.cudnn.allow_tf32
    assert env["triton"] == triton.__version__
    assert {"device", "tf32_matmul", "tf32_cudnn", "triton", "cuda", "cudnn"} <= set(envmod.numerics_key(env))


def test_a_field_recorded_on_one_side_only_is_a_difference():
    """A numerics field one record lacks (a run recorded before Triton was) differs from one that has it."""
    gpu = dict(torch="2.11", device="NVIDIA H100", cuda="12.8", cudnn=91000, tf32_matmul=False, tf32_cudnn=True,
               triton="3.6.0", commit="abc")
    old = {k: v for k, v in gpu.items() if k != "triton"}
    assert envmod.describe_difference(old, gpu) == "triton None -> 3.6.0"


# --------------------------------------------------------------------------------------------------------------
# _files
# --------------------------------------------------------------------------------------------------------------
def test_write_atomic_syncs_the_whole_temporary_beside_the_target_before_the_rename(tmp_path, monkeypatch):
    """write_atomic: the content goes to ``<path>.tmp<pid>`` in the target's folder (a name TEMPORARY knows),
    flushed and fsynced whole before it is renamed over the target."""
    target = tmp_path / "metrics.json"
    synced, seen = [], []
    real_fsync = os.fsync

    def spy(fd):
        synced.append((os.fstat(fd).st_size, target.exists()))
        real_fsync(fd)

    def write(f):
        seen.append(sorted(os.listdir(tmp_path)))
        f.write("x" * 5000)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(str(target), write)
    assert seen == [[f"metrics.json.tmp{os.getpid()}"]] and TEMPORARY.search(seen[0][0])
    assert synced == [(5000, False)]
    assert target.read_text() == "x" * 5000 and os.listdir(tmp_path) == ["metrics.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    """A write that fails half-way leaves the earlier complete file in place (and no temporary)."""
    target = tmp_path / "hparams.json"
    target.write_text('{"lr": 0.1}')

    def fail(f):
        f.write('{"lr": 0.')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(target), fail)
    assert os.listdir(tmp_path) == ["hparams.json"] and read_json(str(target)) == {"lr": 0.1}


def test_read_json_names_a_damaged_file(tmp_path):
    """read_json of a damaged file raises ValueError naming the file and what to do."""
    p = tmp_path / "metrics.json"
    p.write_text('{"round": 1,')
    with pytest.raises(ValueError, match=f"{p} is not valid JSON .*repair or delete it"):
        read_json(str(p))


# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------
# /work/shared/PAPERS.md (LTH, Frankle & Carbin): iterations / batch, optimizer and rate, pruning per round
# (output layers at half the fc rate), reset to θ0 (rewind 0).
PAPER_TABLE = {
    "lenet300_100": dict(optimizer="adam", lr=1.2e-3, batch_size=60, iterations="50000it", prune_fc=0.2,
                         prune_conv=0.0, prune_output=0.1, prune_global=False, milestones=()),
    "conv2": dict(optimizer="adam", lr=2e-4, batch_size=60, iterations="20000it", prune_fc=0.2, prune_conv=0.1,
                  prune_output=0.1, prune_global=False, milestones=()),
    "conv4": dict(optimizer="adam", lr=3e-4, batch_size=60, iterations="25000it", prune_fc=0.2, prune_conv=0.1,
                  prune_output=0.1, prune_global=False, milestones=()),
    "conv6": dict(optimizer="adam", lr=3e-4, batch_size=60, iterations="30000it", prune_fc=0.2, prune_conv=0.15,
                  prune_output=0.1, prune_global=False, milestones=()),
    "resnet20": dict(optimizer="sgd", momentum=0.9, lr=0.1, batch_size=128, iterations="30000it", prune_fc=0.0,
                     prune_conv=0.2, prune_output=0.0, prune_global=True, milestones=(20000, 25000), gamma=0.1),
    "vgg19": dict(optimizer="sgd", momentum=0.9, lr=0.1, batch_size=64, iterations="112000it", prune_fc=0.0,
                  prune_conv=0.2, prune_output=0.0, prune_global=True, milestones=(80 * 782, 120 * 782), gamma=0.1),
    "resnet20_warmup": dict(lr=0.03, warmup=20000, batch_size=128, prune_global=True),
    "vgg19_warmup": dict(lr=0.1, warmup=10000, batch_size=64, prune_global=True),
    "resnet20_lowlr": dict(lr=0.01, warmup=0),
    "vgg19_lowlr": dict(lr=0.01, warmup=0),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_the_presets_are_the_papers_settings(name):
    """Each paper preset has the paper's learning rate, batch size, iterations, pruning rates per layer kind and
    global/layer-wise choice, resets to θ0, and no dropout."""
    hp = get_preset(name)
    assert {k: getattr(hp, k) for k in PAPER_TABLE[name]} == PAPER_TABLE[name]
    assert hp.rewind == "0it" and hp.dropout == 0.0 and hp.control == "imp"


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n != "lenet_quick"])
def test_every_preset_carries_every_paper_hyperparameter(name):
    """A preset is its network's paper_hparams entry field for field (dataset, weight decay, gamma, momentum,
    dropout, milestones, warmup, pruning rates...), with rounds and eval_every per network."""
    p, hp = paper_hparams(name), get_preset(name)
    for k, v in p.items():
        got = getattr(hp, k)
        assert (tuple(got) if k == "milestones" else got) == (f"{v}it" if k == "iterations" else
                                                              tuple(v) if k == "milestones" else v), k
    assert hp.rounds == {"lenet300_100": 16}.get(p["model"], 20)
    assert hp.eval_every == (500 if p["model"] == "lenet300_100" else 1000)


def test_a_preset_takes_whatever_its_paper_entry_says(monkeypatch):
    """get_preset reads every field from the network's paper_hparams entry, not from rules that happen to hold
    for today's table (dropout 0, output at half the fc rate, momentum 0.9 and global pruning for SGD only)."""
    import sparse_lth.models as models
    entry = {**models.PAPER_HPARAMS["conv2"], "dropout": 0.5, "prune_output": 0.15, "momentum": 0.5,
             "prune_global": True}
    monkeypatch.setitem(models.PAPER_HPARAMS, "conv2", entry)
    hp = get_preset("conv2")
    assert (hp.dropout, hp.prune_output, hp.momentum, hp.prune_global) == (0.5, 0.15, 0.5, True)


def test_lenet_quick_is_the_lenet_paper_settings_on_a_short_budget():
    """lenet_quick differs from lenet300_100 in its per-round budget and evaluation interval only."""
    q, full = get_preset("lenet_quick"), get_preset("lenet300_100")
    assert dataclasses.replace(q, iterations=full.iterations, eval_every=full.eval_every) == full


def test_preset_overrides_of_false_and_zero_apply():
    """get_preset overrides apply whatever their value: False, 0 and () replace the preset's."""
    hp = get_preset("resnet20", prune_global=False, weight_decay=0.0, milestones=(), warmup=0)
    assert (hp.prune_global, hp.weight_decay, hp.milestones) == (False, 0.0, ())


# --------------------------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["TORCH", " torch ", "Torch\n"])
def test_the_backend_variable_is_read_case_and_space_insensitively(monkeypatch, value):
    """$SPARSE_LTH_BACKEND is taken whatever its case and surrounding blanks."""
    monkeypatch.setenv("SPARSE_LTH_BACKEND", value)
    assert resolve_backend("cpu") == "torch" and resolve_backend("cpu", "auto") == "torch"


def test_auto_consults_the_variable_and_an_explicit_argument_beats_it(monkeypatch):
    """backend="auto" defers to $SPARSE_LTH_BACKEND like None does; an explicit backend argument wins over it, and
    an unknown value of the variable is refused naming the variable."""
    monkeypatch.setenv("SPARSE_LTH_BACKEND", "interpret")
    assert resolve_backend("cpu", "auto") == "interpret" == resolve_backend("cpu", None)
    assert resolve_backend("cpu", "torch") == "torch"
    monkeypatch.setenv("SPARSE_LTH_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from \$SPARSE_LTH_BACKEND\)"):
        resolve_backend("cpu")


def test_automatic_choice_is_torch_where_no_triton_kernel_can_launch():
    """Under the interpreter (these tests): automatic selection gives torch for CPU and for CUDA tensors (a CUDA
    tensor cannot run interpreted kernels), never triton."""
    assert backend_mod.interpreting()
    assert resolve_backend("cpu") == "torch" and resolve_backend(torch.device("cuda")) == "torch"


def test_explicit_triton_backends_refuse_where_they_cannot_run(monkeypatch):
    """'triton' needs CUDA tensors with the interpreter off; 'interpret' needs CPU tensors with it on; both need
    Triton installed: each refused with a RuntimeError, never run where it cannot."""
    with pytest.raises(RuntimeError, match="backend 'triton'.*needs CUDA tensors and TRITON_INTERPRET unset"):
        resolve_backend("cuda", "triton")  # interpreting: a compiled kernel would not run
    with pytest.raises(RuntimeError, match="backend 'interpret'.*runs Triton kernels on CPU tensors"):
        resolve_backend("cuda", "interpret")
    monkeypatch.setattr(backend_mod, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("cpu", "interpret")
    monkeypatch.undo()
    monkeypatch.setattr(backend_mod, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs Triton, which is not installed"):
        resolve_backend("cpu", "interpret")
    assert resolve_backend("cpu", "torch") == "torch"


# --------------------------------------------------------------------------------------------------------------
# kernels.torch_ops
# --------------------------------------------------------------------------------------------------------------
def _problem(dtype=torch.float32, seed=3, shape=(13, 21), batch=7):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(shape, 0.3, gen)
    fmt = build_format(mask)
    values = torch.randn(fmt.nnz, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, shape[1], generator=gen, dtype=torch.float64)
    dy = torch.randn(batch, shape[0], generator=gen, dtype=torch.float64)
    w = torch.zeros(shape, dtype=torch.float64)
    w[mask] = values
    return fmt, mask, values.to(dtype), x.to(dtype), dy.to(dtype), w


def test_float64_ops_compute_in_float64():
    """float64 operands are multiplied in float64 (the CPU's sparse products take it): results to 1e-12."""
    fmt, mask, v, x, dy, w = _problem(torch.float64)
    torch.testing.assert_close(torch_ops.linear_forward(x, v, fmt), x @ w.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch_ops.linear_backward_input(dy, v, fmt), dy @ w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch_ops.linear_backward_weight(dy, x, fmt), (dy.t() @ x)[mask], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ops_return_their_inputs_dtype(dtype):
    """bfloat16/float16 operands are computed in float32 and every op's result comes back in the input's dtype
    (the weight gradient too, unless out_dtype says otherwise)."""
    fmt, mask, v, x, dy, w = _problem(dtype)
    y = torch_ops.linear_forward(x, v, fmt, torch.ones(fmt.rows, dtype=dtype), activation="relu")
    dx = torch_ops.linear_backward_input(dy, v, fmt)
    dv = torch_ops.linear_backward_weight(dy, x, fmt)
    assert (y.dtype, dx.dtype, dv.dtype) == (dtype, dtype, dtype)
    assert torch_ops.linear_backward_weight(dy, x, fmt, out_dtype=torch.float32).dtype == torch.float32
    wq = torch.zeros_like(w)
    wq[mask] = v.double()
    torch.testing.assert_close(y.double(), torch.relu(x.double() @ wq.t() + 1), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.double(), dy.double() @ wq, rtol=2e-2, atol=2e-2)


def test_float32_ops_run_exactly_under_bf16_autocast():
    """Under CPU bfloat16 autocast the CSR products still run in float32 (the sparse kernels do not take bfloat16):
    the same float32 results as without autocast."""
    fmt, mask, v, x, dy, w = _problem(torch.float32)
    ref = (torch_ops.linear_forward(x, v, fmt), torch_ops.linear_backward_input(dy, v, fmt),
           torch_ops.linear_backward_weight(dy, x, fmt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (torch_ops.linear_forward(x, v, fmt), torch_ops.linear_backward_input(dy, v, fmt),
               torch_ops.linear_backward_weight(dy, x, fmt))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_ops_take_a_format_with_64_bit_pointers():
    """A format whose pointers are int64 (nnz beyond 2**31 - 1) and indices int32 works: the CSR views cast the
    indices to the pointers' dtype."""
    fmt, mask, v, x, dy, w = _problem(torch.float32)
    wide = dataclasses.replace(fmt, row_ptr=fmt.row_ptr.long(), col_ptr=fmt.col_ptr.long(), t_perm=fmt.t_perm.long())
    assert wide.col_idx.dtype == torch.int32
    for csr in (torch_ops.weight_csr(v, wide), torch_ops.weight_t_csr(v, wide)):
        assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int64  # (cuSPARSE reads one dtype)
    torch.testing.assert_close(torch_ops.linear_forward(x, v, wide), torch_ops.linear_forward(x, v, fmt))
    torch.testing.assert_close(torch_ops.linear_backward_input(dy, v, wide), torch_ops.linear_backward_input(dy, v, fmt))
    torch.testing.assert_close(torch_ops.linear_backward_weight(dy, x, wide),
                               torch_ops.linear_backward_weight(dy, x, fmt))


def test_the_linear_ops_refuse_mismatched_operands():
    """values of the wrong length, tensors on two devices, a bias of another dtype, an unknown activation and
    gradients of two batch sizes are refused with the op's own error."""
    fmt, mask, v, x, dy, w = _problem(torch.float32)
    with pytest.raises(ValueError, match="values must be 1-D of length nnz"):
        torch_ops.linear_forward(x, torch.cat([v, v[:1]]), fmt)
    with pytest.raises(ValueError, match="different devices"):
        torch_ops.linear_forward(x, v.to("meta"), fmt)
    with pytest.raises(ValueError, match="bias must be"):
        torch_ops.linear_forward(x, v, fmt, torch.zeros(fmt.rows, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        torch_ops.linear_forward(x, v, fmt, activation="gelu")
    with pytest.raises(ValueError, match="dy has 7 rows, x has 6"):
        torch_ops.linear_backward_weight(dy, x[:6], fmt)


def test_importing_the_torch_ops_silences_torchs_csr_beta_warning():
    """kernels.torch_ops installs the filter for torch's "Sparse CSR tensor support is in beta" UserWarning, so
    users of the CPU path do not see it (the tests' pytest.ini ignores it too, which hides its absence)."""
    import importlib
    with warnings.catch_warnings():
        warnings.resetwarnings()
        importlib.reload(torch_ops)
        assert any(action == "ignore" and msg is not None and msg.match("Sparse CSR tensor support is in beta state")
                   and cat is UserWarning for action, msg, cat, *_ in warnings.filters)


def test_an_empty_format_gives_empty_gradients_and_zero_outputs():
    """A fully pruned layer (nnz 0): zero outputs and input gradients, an empty weight gradient of out_dtype."""
    fmt = build_format(torch.zeros(4, 6, dtype=torch.bool))
    x, dy, v = torch.randn(3, 6), torch.randn(3, 4), torch.zeros(0)
    assert torch.equal(torch_ops.linear_forward(x, v, fmt), torch.zeros(3, 4))
    assert torch.equal(torch_ops.linear_backward_input(dy, v, fmt), torch.zeros(3, 6))
    dv = torch_ops.linear_backward_weight(dy, x, fmt, out_dtype=torch.float64)
    assert dv.shape == (0,) and dv.dtype == torch.float64

"""What a run records about its machine and code, what counts as other numerics, and the warnings a resume or a
later round under other numerics gives (a CPU with another instruction set changes every digit: see
results/lenet300_100/README.md)."""
import json
import os
import re
import subprocess
import warnings

import pytest
import torch

from sparse_lth import environment as envmod
from sparse_lth.environment import describe, describe_difference, environment, numerics_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_environment_names_what_decides_the_numbers():
    env = environment("cpu")
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
    assert env["device"].startswith("cpu: ")
    assert json.loads(json.dumps(env)) == env  # plain JSON: it goes into metrics.json
    assert set(numerics_key(env)) == {"torch", "device", "cpu_capability", "threads"}
    line = describe(env)
    assert env["cpu_capability"] in line and f"torch {torch.__version__}" in line and env["commit"] in line


def test_only_numerics_fields_count_as_a_difference():
    env = environment("cpu")
    assert describe_difference(env, dict(env)) == ""
    assert describe_difference(env, {**env, "commit": "0123456789ab", "python": "3.0"}) == ""
    d = describe_difference({**env, "cpu_capability": "AVX2"}, {**env, "cpu_capability": "AVX512"})
    assert d.startswith("cpu_capability AVX2 -> AVX512") and "ATEN_CPU_CAPABILITY=avx2" in d
    d = describe_difference({**env, "threads": 1}, {**env, "threads": 2})
    assert d == "threads 1 -> 2"
    # a CUDA run's record (triton is recorded there, whose kernels its sparse layers run): another Triton warns
    gpu = dict(torch="2.11", device="NVIDIA H100", cuda="12.8", cudnn=91000, tf32_matmul=False, tf32_cudnn=True,
               triton="3.6.0", commit="abc")
    assert describe_difference(gpu, {**gpu, "triton": "3.8.0"}) == "triton 3.6.0 -> 3.8.0"


def test_git_commit_is_the_checkouts_head_or_the_override(monkeypatch):
    monkeypatch.setenv("SPARSE_LTH_COMMIT", "feedbeef0000")
    assert envmod.git_commit() == "feedbeef0000"
    monkeypatch.delenv("SPARSE_LTH_COMMIT")
    if not os.path.exists(os.path.join(REPO, ".git")):
        assert envmod.git_commit() == "unknown"
        return
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    envmod._checkout_commit.cache_clear()  # asked once per process: HEAD may have moved since (a commit mid-run)
    got = envmod.git_commit()
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", got) and got.split("-")[0] == head


def test_warn_if_changed():
    env = environment("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert envmod.warn_if_changed(None, env, "x") is False  # a run from before environments were recorded
        assert envmod.warn_if_changed({**env, "commit": "other"}, env, "x") is False
    with pytest.warns(RuntimeWarning, match="round 3 runs under other numerics than before: cpu_capability"):
        assert envmod.warn_if_changed({**env, "cpu_capability": "AVX2"}, {**env, "cpu_capability": "AVX512"},
                                      "round 3 runs") is True


def test_a_gpu_environment_reads_as_one_line():
    env = dict(torch="2.11.0", device="NVIDIA H100 80GB HBM3", cuda="12.8", cudnn=91000, tf32_matmul=False,
               tf32_cudnn=True, triton="3.6.0", commit="cf80ff6aed2e", python="3.12.3")
    assert describe(env) == ("NVIDIA H100 80GB HBM3, TF32 matmul off / cuDNN on, torch 2.11.0, triton 3.6.0, "
                             "commit cf80ff6aed2e")
    assert describe_difference(env, {**env, "tf32_matmul": True}) == "tf32_matmul False -> True"

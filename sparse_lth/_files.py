"""Reading and writing run folders' files, and the one spelling of their step counts (torch-free: the report
imports it)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

TEMPORARY = re.compile(r"\.tmp\d+$")  # the suffix of write_atomic's temporaries: ".tmp<pid>"


def write_atomic(path: str, write, binary: bool = False) -> None:
    """``write(f)`` into a temporary beside ``path``, synced to disk, then renamed over ``path``: a kill never
    leaves half a file at ``path``, a crash of the machine no empty one. A failure (a full disk, an error, a
    second Ctrl-C) removes the temporary; a hard kill leaves it (:data:`TEMPORARY` names it for a later cleanup)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def copy_atomic(src: str, dst: str) -> None:
    """``src``'s bytes to ``dst`` through :func:`write_atomic`: a kill during the copy leaves no truncated ``dst``
    (which a later run, finding it there, would take as complete)."""
    with open(src, "rb") as f_in:
        write_atomic(dst, lambda f_out: shutil.copyfileobj(f_in, f_out, 1 << 20), binary=True)


def read_json(path: str):
    """``json.load`` of ``path``; a damaged file (an edit, a disk that filled up) is named in the error."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): repair or delete it") from None


STEP_FIELDS = ("iterations", "rewind")


def canonical_steps(value) -> str:
    """One spelling per step count: ``"Nit"`` for a whole number of iterations however written (``3000``,
    ``"3000"``, ``"3000it"``, ``"3e3"``; zero epochs too), ``"Xep"`` for epochs with ``X`` exact (``"2ep"`` for
    ``"2.0ep"``, ``"0.125ep"``); anything else unchanged (the experiment's validation refuses it clearly)."""
    s = str(value).strip().lower()
    try:
        if s.endswith("ep"):
            x = float(s[:-2])
            if x == 0:
                return "0it"
            return f"{int(x)}ep" if x == int(x) else f"{x!r}ep"
        n = float(s[:-2] if s.endswith("it") else s)
        return f"{int(n)}it" if n == int(n) else str(value)
    except (ValueError, OverflowError):
        return str(value)


def canonical_hparams(d: dict) -> dict:
    """A hyperparameter dict (``hparams.json``'s) with its step counts in their one spelling: what tells two
    experiments apart, however each was written."""
    return {k: canonical_steps(v) if k in STEP_FIELDS else v for k, v in d.items()}

"""Reading run folders' JSON files, and the one spelling of their step counts (torch-free: the report imports it)."""
from __future__ import annotations

import json


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

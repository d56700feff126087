"""Reading the JSON files of run folders (torch-free: the report imports it)."""
from __future__ import annotations

import json


def read_json(path: str):
    """``json.load`` of ``path``; a damaged file (an edit, a disk that filled up) is named in the error."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): repair or delete it") from None

"""Named sets of IMP hyperparameters: the papers' settings per network (from :data:`sparse_lth.models.PAPER_HPARAMS`)
and ``lenet_quick``, a whole IMP loop on MNIST that runs on a 2-core CPU in a few minutes.

``get_preset(name, **overrides) -> ImpHparams``; :data:`PRESET_NAMES` lists them.
"""
from __future__ import annotations

import dataclasses

from .imp import ImpHparams

# Pruning rounds per network (the papers prune until accuracy collapses; these reach the sparsities they plot):
# LeNet-300-100 at fc 20% / output 10% reaches 3.6% remaining after 15 rounds and 2.9% after 16.
_ROUNDS = {"lenet300_100": 16, "conv2": 20, "conv4": 20, "conv6": 20}
_DEFAULT_ROUNDS = 20
_EVAL_EVERY = {"lenet300_100": 500}
_DEFAULT_EVAL_EVERY = 1000


def _from_paper(name: str) -> ImpHparams:
    from .models import paper_hparams
    p = paper_hparams(name)
    model = p["model"]
    return ImpHparams(
        model=model, dataset=p["dataset"], dropout=float(p.get("dropout", 0.0)), optimizer=p["optimizer"],
        lr=float(p["lr"]), momentum=float(p["momentum"]), weight_decay=float(p["weight_decay"]),
        batch_size=int(p["batch_size"]), iterations=f"{int(p['iterations'])}it",
        milestones=tuple(int(m) for m in p["milestones"]), gamma=float(p["gamma"]), warmup=int(p["warmup"]),
        eval_every=_EVAL_EVERY.get(model, _DEFAULT_EVAL_EVERY), rounds=_ROUNDS.get(model, _DEFAULT_ROUNDS),
        prune_fc=float(p["prune_fc"]), prune_conv=float(p["prune_conv"]), prune_output=float(p["prune_output"]),
        prune_global=bool(p["prune_global"]))


def _quick() -> ImpHparams:
    # The LeNet-300-100 paper settings (Adam 1.2e-3, batch 60, fc 20% / output 10% per round, rewind to 0) with
    # 3000 iterations (3 epochs) per round instead of 50K: 16 rounds reach 2.9% of the weights remaining.
    return dataclasses.replace(_from_paper("lenet300_100"), iterations="3000it", eval_every=250)


def _paper_names() -> list[str]:
    from .models import PAPER_HPARAMS
    return list(PAPER_HPARAMS)


PRESET_NAMES: tuple[str, ...] = tuple(_paper_names()) + ("lenet_quick",)


def get_preset(name: str, **overrides) -> ImpHparams:
    """The hyperparameters of preset ``name`` with ``overrides`` (field=value) applied."""
    if name == "lenet_quick":
        hp = _quick()
    elif name in PRESET_NAMES:
        hp = _from_paper(name)
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    fields = {f.name for f in dataclasses.fields(ImpHparams)}
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"unknown hyperparameters {sorted(bad)}")
    return dataclasses.replace(hp, **overrides)

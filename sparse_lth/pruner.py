"""IMP with rewinding inside a training loop of your own.

:class:`MagnitudePruner` is the pruning half of ``sparse-lth imp`` without its training loop, run folders or
data: keep your loop (your data pipeline, augmentation, mixed precision, schedules, logging) and call it between
rounds::

    from sparse_lth.layers import sparsify
    from sparse_lth.pruner import MagnitudePruner
    import sparse_lth.optim

    model = sparsify(make_model())                       # sparse layers: pruned weights stay zero by themselves
    pruner = MagnitudePruner(model, fc=0.2, conv=0.1)     # the output layer at half the fc rate, as the paper
    pruner.set_rewind_point()                             # θ0; or call it at iteration k of round 0 (late rewinding)
    for r in range(rounds + 1):
        optimizer = sparse_lth.optim.Adam(model.parameters(), lr=1.2e-3)   # a new one every round
        train(model, optimizer)                                            # your loop
        print(r, pruner.percent_remaining, evaluate(model))
        if r < rounds:
            pruner.prune_and_rewind()     # prune 20 % of the surviving weights by magnitude, rewind to θ0

Pruning is the driver's own (:func:`sparse_lth.imp.magnitude_prune`, layer-wise or global within each layer kind,
:func:`sparse_lth.imp.layer_rates`): given the same trained weights it gives the same masks as ``sparse-lth imp``
(tested against the driver's saved rounds). Other criteria than the magnitude (``score=``: how far a weight moved,
how much its magnitude grew, or a function of one's own) prune the same counts. A new mask replaces a sparse
layer's trainable parameters, so build the optimizer after each :meth:`~MagnitudePruner.prune` or
:meth:`~MagnitudePruner.prune_and_rewind` (one built before raises at its ``step()``).

The paper's controls take two lines each with :func:`sparse_lth.imp.apply_masks` and
:func:`sparse_lth.imp.random_masks`, at any round::

    from sparse_lth.imp import apply_masks, random_masks
    masks = pruner.masks
    fresh = sparsify(make_model())                # random reinitialization: the ticket's masks, new weights
    apply_masks(fresh, masks)
    keep = {n: int(m.sum()) for n, m in masks.items()}      # random pruning: each layer's live count, random
    other = sparsify(make_model_at_theta0())                # positions, the ticket's starting weights
    apply_masks(other, random_masks({n: tuple(m.shape) for n, m in masks.items()}, keep,
                                    torch.Generator().manual_seed(0)))

Anything else that holds the parameters (``DistributedDataParallel``, an EMA copy) needs the same after a mask
change (on the dense path too: a mask change gives every pruned layer new parameters): wrap or build it again,
like the optimizer. Under DistributedDataParallel every rank runs the same pruner on the same (synchronized)
weights and so computes the same masks, and takes rank 0's path for each sparse layer (on a GPU a path is
chosen by timing, which may fall either side of a tie on two ranks); wrap the model again each round
(``ddp = DDP(model)`` after ``prune_and_rewind``). A wrapper kept from before fails at the next backward with DDP's "Expected to have finished
reduction in the prior iteration" (it still holds the old parameters). Tested on the CPU with two gloo processes:
the ranks stay identical and each round equals single-process training on both ranks' batches. A
``torch.compile``d model follows a mask change by itself (checked on the CPU).

Plain ``nn.Linear``/``nn.Conv2d`` layers (a model not sparsified) are pruned too, as dense masking: their mask is
a ``weight_mask`` buffer and nothing stops the optimizer from reviving pruned weights, so a loop over such a model
calls :meth:`~MagnitudePruner.mask_gradients` before ``optimizer.step()`` and :meth:`~MagnitudePruner.remask`
after it (both do nothing to sparse layers).
"""
from __future__ import annotations

import torch
from torch import nn

from .imp import (PRUNE_SCORES, _load_weights, _oneshot_fractions, apply_masks, count_masks,
                  dense_weight, get_masks, global_groups, layer_kinds, layer_rates, live_and_total,
                  prunable_layers, prune_by_score, pruning_schedule, warn_reparametrized, weight_scores)
from .train import plain_masked_modules

__all__ = ["MagnitudePruner"]

_PATHS = ("auto", "dense", "sparse")

#: Built-in pruning scores, as ``sparse-lth imp --prune-score`` names them (the weights with the lowest scores go);
#: ``w``: the weight now, ``w0``: at the rewind point.
SCORES = PRUNE_SCORES


def _rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number (a fraction of the surviving weights), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) of the surviving weights pruned per round, "
                         f"got {value}")
    return value


class MagnitudePruner:
    """Iterative magnitude pruning with rewinding of ``model``'s layers, for a training loop of one's own.

    ``fc``, ``conv``, ``output``: the fraction of each layer's surviving weights pruned per round, by layer kind
    (fully connected, convolutional, the output layer: the model's ``output_layer`` attribute, else its last
    linear layer); ``output`` defaults to half of ``fc``, the paper's rule. ``global_pruning``: pool the layers
    of each kind and prune the smallest weights of the pool wherever they are (the paper's choice for VGG and
    ResNet), instead of the same fraction of every layer. ``dense_layers``: names of layers never pruned.
    ``path``: how sparse layers run after a new mask ("auto": each layer's automatic choice; "dense", "sparse").
    ``score``: what decides which weights go (the lowest scores): "magnitude" (IMP's, the default), one of
    :data:`SCORES` ("movement", "magnitude_increase", which compare the weights with the rewind point), or a
    function ``score(name, weight, rewind_weight) -> tensor of the weight's shape``
    (``rewind_weight`` None before :meth:`set_rewind_point`).

    The layers pruned are the model's sparse layers and plain ``nn.Linear``/``nn.Conv2d`` (not one whose weight is
    reparametrized, by weight_norm, spectral_norm or ``torch.nn.utils.parametrize``: a mask would not hold on a
    weight computed at every forward; such layers stay dense, with a warning), named when the pruner
    is made and looked up by name at every call (so ``sparsify`` may come before or after; adding or removing a
    layer afterwards is refused).
    """

    def __init__(self, model: nn.Module, *, fc: float = 0.2, conv: float = 0.1, output: float | None = None,
                 global_pruning: bool = False, dense_layers=(), path: str = "auto", score="magnitude"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        layers = prunable_layers(model)
        warn_reparametrized(model)
        if not layers:
            raise ValueError("the model has no layer to prune (no nn.Linear, nn.Conv2d or sparse layer)")
        self.kinds = layer_kinds(model)  # all convolutional (a 1x1-conv classifier): no output layer's rate
        fc, conv = _rate("fc", fc), _rate("conv", conv)
        output = fc / 2 if output is None else _rate("output", output)
        if isinstance(dense_layers, str):
            dense_layers = (dense_layers,)
        unknown = sorted(set(dense_layers) - set(self.kinds))
        if unknown:
            raise ValueError(f"dense_layers {unknown} are not prunable layers of the model; they are "
                             f"{list(self.kinds)}")
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        if isinstance(score, str) and score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)} or a function, got {score!r}")
        if not isinstance(score, str) and not callable(score):
            raise TypeError(f"score must be a name ({sorted(SCORES)}) or a function, got {type(score).__name__}")
        self.score = score
        self.rates = layer_rates(self.kinds, fc=fc, conv=conv, output=output, dense_layers=tuple(dense_layers))
        self.groups = global_groups(self.kinds, self.rates) if global_pruning else None
        self.path = path
        self.round = 0
        self._rewind: dict[str, torch.Tensor] | None = None
        self._warned_plain = False

    # ------------------------------------------------------------------------------------------------- state
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer: bool mask}``, copies of the layers' current masks."""
        return get_masks(self._layers_now())

    def remaining(self) -> dict[str, tuple[int, int]]:
        """``{layer: (live weights, all weights)}``."""
        return count_masks(self.masks)

    @property
    def percent_remaining(self) -> float:
        """The percent of the prunable weights still live, over all pruned and unpruned layers."""
        live, total = live_and_total(self.masks)
        return 100.0 * live / total

    def schedule(self, rounds: int) -> list[float]:
        """The percent of weights remaining after rounds 0..``rounds`` from the dense network, known before any
        training (exact: every round prunes a fixed share of each layer's, or pool's, survivors)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        shapes = {n: tuple(dense_weight(m).shape) for n, m in prunable_layers(self._layers_now())}
        total = sum(torch.Size(s).numel() for s in shapes.values())
        rows = pruning_schedule(shapes, self.rates, self.groups, rounds)
        return [100.0 * sum(row.values()) / total for row in rows]

    def _layers_now(self) -> nn.Module:
        names = [n for n, _ in prunable_layers(self.model)]
        if names != list(self.kinds):
            raise RuntimeError(f"the model's prunable layers changed since the pruner was made (then "
                               f"{list(self.kinds)}, now {names}): make the pruner after adding or removing "
                               f"layers")
        return self.model

    # ----------------------------------------------------------------------------------------------- actions
    def set_rewind_point(self) -> None:
        """Remember the model's weights now (copies of every parameter and buffer but the masks) as the point
        that :meth:`rewind` resets the surviving weights to: call it before training for θ0 (the lottery
        ticket), or at iteration k of the dense network's training for late rewinding."""
        self._layers_now()
        self._rewind = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                        if not k.endswith("weight_mask")}

    def prune(self, rounds: int = 1) -> dict[str, torch.Tensor]:
        """Prune each layer's (or each pool's) surviving weights of lowest score (the smallest magnitudes unless
        the pruner was given another ``score``), at the pruner's rates, and set the new masks (the surviving
        weights keep their values). ``rounds``: prune at once as many weights as that many rounds would (one-shot
        pruning: ``prune(rounds=10)`` after the dense network's training gives the survivors' count of 10
        iterative rounds). Returns the new masks. Build the optimizer
        again afterwards."""
        return self._prune(rounds, rewind=False)

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every weight, bias and buffer to the rewind point, keeping the current masks and the layers'
        parameters (values are written in place: an optimizer built before still steps them, with its state)."""
        if self._rewind is None:
            raise RuntimeError("no rewind point: call set_rewind_point() first")
        model = self._layers_now()
        _load_weights(model, self._rewind)  # a sparse layer writes the live entries only (its mask is kept)
        for _, m in plain_masked_modules(model):  # a plain layer's pruned entries got θ0's values: 0 again
            m.weight.copy_(torch.where(m.weight_mask, m.weight, 0))

    def prune_and_rewind(self, rounds: int = 1) -> dict[str, torch.Tensor]:
        """One IMP step between rounds: :meth:`prune` the trained weights (``rounds`` as there), then
        :meth:`rewind` the survivors (one mask change per layer). Returns the new masks. Build the optimizer
        again afterwards."""
        return self._prune(rounds, rewind=True)

    def _prune(self, rounds: int, rewind: bool) -> dict[str, torch.Tensor]:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if rewind and self._rewind is None:
            raise RuntimeError("no rewind point: call set_rewind_point() before training (θ0), or at the rewind "
                               "iteration of the dense network's training")
        model = self._layers_now()
        layers = prunable_layers(model)
        masks = get_masks(model)
        fractions = self.rates
        if rounds > 1:  # the share of each pool's survivors that `rounds` rounds remove, as the driver's one-shot
            fractions = _oneshot_fractions({n: (int(mk.sum()),) for n, mk in masks.items()}, self.rates,
                                           self.groups, rounds)
        masks = prune_by_score(self._scores(layers), masks, fractions, self.groups)
        if rewind:
            self._load_rewind_point(masks)
        else:
            self._set_masks(model, masks)
        self.round += rounds
        return {n: mk.clone() for n, mk in masks.items()}

    def _scores(self, layers) -> dict[str, torch.Tensor]:
        weights = {n: dense_weight(m) for n, m in layers}
        if isinstance(self.score, str):  # the driver's own scores (imp.weight_scores)
            if self.score != "magnitude" and self._rewind is None:
                raise RuntimeError(f"score {self.score!r} compares the weights with the rewind point: call "
                                   f"set_rewind_point() first")
            return weight_scores(self.score, weights, self._rewind)
        out = {}
        for n, w in weights.items():
            w0 = None if self._rewind is None else self._rewind[f"{n}.weight"].to(w.device)
            v = self.score(n, w, w0)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(w.shape):
                raise ValueError(f"score for {n} must be a tensor of the weight's shape {tuple(w.shape)}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            if torch.isnan(v).any():
                raise ValueError(f"score for {n} has NaN values")
            out[n] = v.detach()
        return out

    def _load_rewind_point(self, masks: dict[str, torch.Tensor]) -> None:
        if self._rewind is None:
            raise RuntimeError("no rewind point: call set_rewind_point() first")
        model = self._layers_now()
        _load_weights(model, self._rewind)
        self._set_masks(model, masks)

    def _set_masks(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """apply_masks, then, under torch.distributed, every rank's sparse layers on rank 0's paths: on a GPU an
        automatic path is chosen by timing, and ranks whose timings fall either side of a tie would give the same
        layer other parameters (``values`` or ``weight``), which the next ``DDP(model)`` cannot wrap. Every rank
        runs the pruner (see the module docstring), so this collective is reached by all."""
        apply_masks(model, masks, path=self.path)
        self._warn_plain_layers(model, masks)
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        from .layers import sparse_layers
        layers = dict(sparse_layers(model))
        labels = [{n: m.path_label for n, m in layers.items()}]
        dist.broadcast_object_list(labels, src=0)
        for n, label in labels[0].items():
            if layers[n].path_label != label:
                layers[n].restore_path(label)

    def _warn_plain_layers(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """Once per pruner: a sparsified model whose pruned layers include plain ones (``sparsify`` leaves a
        Linear subclass, MultiheadAttention's projections and tied weights alone) needs mask_gradients and remask
        for those, which the loop for a sparsified model does not call: without them the optimizer revived their
        pruned weights while ``percent_remaining`` counted them pruned."""
        if self._warned_plain:
            return
        from .layers import sparse_layers
        if not sparse_layers(model):  # a plain model: dense masking throughout, as documented
            return
        plain = [n for n, m in prunable_layers(model) if not hasattr(m, "set_mask") and not bool(masks[n].all())]
        if plain:
            import warnings
            warnings.warn(f"pruned layers {plain} are plain nn.Linear/nn.Conv2d in a sparsified model (sparsify "
                          "leaves subclasses, MultiheadAttention's projections and tied weights alone): nothing "
                          "keeps their pruned weights at zero unless the loop calls pruner.mask_gradients() before "
                          "each optimizer.step() and pruner.remask() after it (both leave sparse layers alone)",
                          UserWarning, stacklevel=4)
            self._warned_plain = True

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights in plain masked layers (dense masking: call before
        ``optimizer.step()``). Sparse layers mask their gradients themselves."""
        for _, m in plain_masked_modules(self.model):
            if m.weight.grad is not None:
                m.weight.grad.mul_(m.weight_mask.to(m.weight.grad.dtype))

    @torch.no_grad()
    def remask(self) -> None:
        """Zero the pruned weights of plain masked layers again (dense masking: call after ``optimizer.step()``,
        whose momentum or weight decay may have moved them). Sparse layers need nothing."""
        for _, m in plain_masked_modules(self.model):
            m.weight.mul_(m.weight_mask.to(m.weight.dtype))

    # ----------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The pruner's state, for a checkpoint beside the model's: the round count and the rewind point (the
        masks are in the model's own ``state_dict``)."""
        return {"round": self.round, "rewind": self._rewind, "rates": dict(self.rates), "groups": self.groups}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; refused when it was made with other rates or layers."""
        missing = {"round", "rewind", "rates", "groups"} - set(state)
        if missing:
            raise ValueError(f"not a MagnitudePruner state: missing {sorted(missing)}")
        if dict(state["rates"]) != self.rates or state["groups"] != self.groups:
            raise ValueError(f"the state is of a pruner with other rates or layers ({state['rates']}, global "
                             f"pools {state['groups']}) than this one ({self.rates}, {self.groups})")
        self.round = int(state["round"])
        rewind = state["rewind"]
        self._rewind = None if rewind is None else {k: v.clone() for k, v in rewind.items()}

    def __repr__(self) -> str:
        kinds = {}
        for n, k in self.kinds.items():
            kinds.setdefault(k, set()).add(self.rates[n])
        rates = ", ".join(f"{k}={'/'.join(f'{v:g}' for v in sorted(vs))}" for k, vs in kinds.items())
        score = "" if self.score == "magnitude" else \
            f"score={self.score if isinstance(self.score, str) else getattr(self.score, '__name__', 'custom')}, "
        return (f"MagnitudePruner({len(self.kinds)} layers, {rates}, {score}"
                f"{'global' if self.groups is not None else 'layer-wise'}, round {self.round}, "
                f"{self.percent_remaining:.3g}% remaining)")

"""Mask-aware optimizers: SGD, Adam and AdamW with torch.optim's semantics, for sparse-lth's two layer paths.

- Sparse path: the trainable parameter is the compact vector of live weights; the update is a plain fused update.
- Dense path: the trainable parameter is the dense weight, zero at pruned positions, and the layer attaches the mask
  (a bool tensor of the weight's shape, on its device) to the Parameter as the attribute ``_sparse_lth_mask``.
  These optimizers read it at every step (the layer may replace it between IMP rounds) and apply it within the
  update: the gradient at a pruned position is ignored, and the weight and every state tensor (momentum_buffer,
  exp_avg, exp_avg_sq, max_exp_avg_sq) stay exactly zero there.

The trajectory of the live weights is that of ``torch.optim`` with the gradient masked before each step and the
weight re-masked after it (the usual dense-masking recipe), to fp32 rounding. State is float32, also for bfloat16 /
float16 parameters (arithmetic in fp32, the parameter rounded once per step), so for such parameters the result is
*more* accurate than torch.optim's, which keeps state in the parameter's dtype.

Backends, per parameter device (:func:`sparse_lth.backend.resolve_backend`): ``triton`` / ``interpret`` run the
multi-tensor Triton kernels of :mod:`sparse_lth.kernels.optim` (one pass over memory per parameter, a few launches
per step for a whole model); ``torch`` runs torch's fused optimizer kernels on CPU and ``torch._foreach_*`` ops
elsewhere (``opt.torch_impl = "fused" | "foreach" | "auto"`` overrides), with the mask applied around them. On CPU
the torch backend masks a masked fp32 parameter's contiguous ``.grad`` in place (as the dense-masking recipe and a
dense-path layer do; other gradients are masked on a copy); the Triton backends leave ``.grad`` as it is.

State-dict keys are torch.optim's (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
so state dicts load across these optimizers and their torch.optim counterparts.

CUDA graphs: ``Adam(..., capturable=True)`` / ``AdamW`` keep each ``state['step']`` on its parameter's device; the
Triton kernel reads it and computes the bias corrections there (fp64), the torch backend runs torch's fused
kernels, which read it too. Once warmed up, a step then reads nothing back from the device and, with cached
tables, copies nothing to it, so it can be captured. SGD needs no flag (take one step before capturing: with
momentum the first step is different). A non-capturable Adam's step, or SGD's first momentum step, inside a
capture is refused with a clear error.
"""
from __future__ import annotations

import weakref
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.autograd.graph import increment_version

from .backend import BACKENDS, resolve_backend
from .kernels import optim as _k

__all__ = ["MASK_ATTR", "param_mask", "SGD", "Adam", "AdamW"]

MASK_ATTR = "_sparse_lth_mask"
PARAM_DTYPES = _k.PARAM_DTYPES
_ZERO = {}


def param_mask(p: torch.Tensor) -> torch.Tensor | None:
    """The pruning mask a dense-path layer attached to parameter ``p`` (attribute ``_sparse_lth_mask``), or None.

    Raises a clear error when the attribute is there but unusable: not a Tensor, not bool/uint8, a shape other than
    the parameter's, or another device.
    """
    mask = getattr(p, MASK_ATTR, None)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{MASK_ATTR} of a parameter of shape {tuple(p.shape)} is a {type(mask).__name__}, "
                        "not a Tensor")
    if mask.shape != p.shape:
        raise ValueError(f"{MASK_ATTR} has shape {tuple(mask.shape)} but its parameter has shape {tuple(p.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{MASK_ATTR} has dtype {mask.dtype}; a mask must be torch.bool (or torch.uint8)")
    if mask.device != p.device:
        raise ValueError(f"{MASK_ATTR} is on device {mask.device} but its parameter is on device {p.device}")
    return mask


def _zero(device: torch.device) -> torch.Tensor:
    z = _ZERO.get(device)
    if z is None:
        z = _ZERO[device] = torch.zeros((), dtype=torch.float32, device=device)
    return z


def _where_(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """x[~live] = 0 in place (NaN-safe, unlike x *= live)."""
    return torch.where(live, x, _zero(x.device).to(x.dtype), out=x)


def _scalar_view(t: torch.Tensor):
    """A NumPy 0-d array sharing ``t``'s one element (a 0-d CPU tensor that needs no grad), or None."""
    if t.dim() != 0 or t.requires_grad or t.is_conj() or t.is_neg():
        return None
    try:
        view = t.numpy()
    except (RuntimeError, TypeError):  # e.g. a tensor subclass, or a dtype NumPy lacks
        return None
    return view if view.ndim == 0 else None


def _mask_key(mask: torch.Tensor) -> tuple[int, int] | None:
    """What tells a mask's contents apart over time: its version counter (an in-place edit) and its address
    (``mask.data = other`` keeps the version); None for an inference tensor, which has no version counter."""
    try:
        return mask._version, mask.data_ptr()
    except RuntimeError:
        return None


def _state_tensor(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _check_grad(opt, p: torch.Tensor, g: torch.Tensor) -> None:
    if g.dtype is p.dtype and g.shape == p.shape and g.device == p.device and not g.is_sparse \
            and p.dtype in PARAM_DTYPES:
        return
    name = type(opt).__name__
    if g.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name}: parameter of dtype {p.dtype} is not supported; use one of {PARAM_DTYPES}")
    raise ValueError(f"{name}: gradient ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match its parameter "
                     f"({p.dtype}, {tuple(p.shape)}, {p.device})")


class _Item:
    """One parameter taking part in a step: its tensors as the update sees them."""

    __slots__ = ("p", "g", "mask", "group", "state", "work")

    def __init__(self, p, g, mask, group, state):
        self.p, self.g, self.mask, self.group, self.state = p, g, mask, group, state
        self.work = p  # the contiguous tensor the kernel updates (a copy when p is not contiguous)


class _MaskedOptimizer(Optimizer):
    """Shared machinery: gathering the parameters with gradients, backend dispatch, mask bookkeeping, state dicts."""

    def __init__(self, params, defaults: dict[str, Any]):
        backend = defaults.get("backend")
        if backend is not None and backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}, 'auto' or None")
        super().__init__(params, defaults)
        # torch backend: the (mask, version) whose zeros the state of a parameter already respects.
        self._mask_seen: dict[torch.Tensor, tuple[weakref.ref, int]] = {}
        # torch backend: "auto" (torch's fused CPU kernels on CPU, foreach ops elsewhere), "fused" or "foreach"
        self.torch_impl = "auto"
        # torch backend on CPU: the mask as int32 bits (see _mask_bits)
        self._bits: dict[torch.Tensor, tuple] = {}
        # Adam: per parameter's id, (its CPU step tensor, a NumPy view of it, its address) (Adam._step_tensors)
        self._step_views: dict[int, tuple] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        """Refuse what a group can carry in from torch.optim (add_param_group, a torch state dict) but this
        optimizer would silently not do: maximize, and the other kind of weight decay (torch's Adam with
        decoupled_weight_decay=True is AdamW)."""
        if group.get("maximize"):
            raise ValueError(f"{type(self).__name__} does not implement maximize=True (a parameter group has it); "
                             "negate the loss instead")
        decoupled = group.get("decoupled_weight_decay")
        if decoupled is not None and hasattr(self, "_decoupled") and bool(decoupled) != self._decoupled:
            raise ValueError(f"a parameter group has decoupled_weight_decay={bool(decoupled)}, but "
                             f"{type(self).__name__} applies {'decoupled' if self._decoupled else 'L2'} weight "
                             f"decay; use {'Adam' if self._decoupled else 'AdamW'}")

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's state, plus the execution setting ``torch_impl`` and each parameter's mask attribute:
        ``copy.deepcopy`` copies a Parameter without its Python attributes, and the copy would train its pruned
        weights."""
        state = super().__getstate__()
        state["torch_impl"] = self.torch_impl
        state["_param_masks"] = [(q, getattr(q, MASK_ATTR)) for g in self.param_groups for q in g["params"]
                                 if getattr(q, MASK_ATTR, None) is not None]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        masks = state.pop("_param_masks", ())
        super().__setstate__(state)
        for q, mask in masks:
            if getattr(q, MASK_ATTR, None) is None:
                setattr(q, MASK_ATTR, mask)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if not hasattr(self, "_mask_seen"):
            self._mask_seen = {}
        if not hasattr(self, "torch_impl"):
            self.torch_impl = "auto"
        if not hasattr(self, "_bits"):
            self._bits = {}
        if not hasattr(self, "_step_views"):
            self._step_views = {}

    # -- state dicts ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, except that floating state stays float32 (torch casts it to the parameter's dtype, which
        would round the fp32 state of bf16 parameters) and is made contiguous."""
        from .layers import _refuse_replaced_parameters
        _refuse_replaced_parameters(self, (), {}, what="load_state_dict")  # the cause, not a shape mismatch
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        if [len(g["params"]) for g in saved_groups] == [len(g["params"]) for g in self.param_groups]:
            # (torch.optim checks the group sizes itself, below). The fused kernels read raw memory: a state of
            # another shape would be read out of bounds, so it is refused before anything is loaded.
            for pid, values in saved_state.items():
                p = id_map.get(pid)
                for key, val in values.items():
                    if p is not None and key != "step" and isinstance(val, torch.Tensor) and val.shape != p.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of shape {tuple(val.shape)} for a parameter of shape "
                            f"{tuple(p.shape)}: the state dict is another model's, or the layer was on another path "
                            "when it was saved (the sparse path's values hold one entry per live weight; "
                            "restore_path puts a layer back on a recorded path)")
        backends = [g.get("backend") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, backend in zip(self.param_groups, backends):
            # where it runs is this optimizer's choice, not the saved one's (a checkpoint saved with "triton")
            group["backend"] = backend
            self._check_group(group)
        capturable = {id(q) for g in self.param_groups if g.get("capturable") for q in g["params"]}
        for pid, values in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            for key, val in values.items():
                if key == "step" and isinstance(val, (int, float)):  # a state dict from before steps were tensors
                    val = torch.tensor(float(val))
                if not isinstance(val, torch.Tensor):
                    continue
                if key == "step":
                    dev = p.device if id(p) in capturable else "cpu"
                    self.state[p][key] = val.detach().to(device=dev, dtype=torch.float32).clone()
                elif val.is_floating_point():
                    t = torch.empty(val.shape, dtype=torch.float32, device=p.device)
                    self.state[p][key] = t.copy_(val.detach())
        self._mask_seen.clear()

    # -- step ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel_items: dict[tuple[torch.device, str], list[_Item]] = {}
        torch_items: list[tuple[dict, list[_Item]]] = []
        resolved: dict[tuple[torch.device, Any], str] = {}
        for group in self.param_groups:
            group_torch: list[_Item] = []
            requested = group.get("backend")
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                _check_grad(self, p, g)
                dev = p.device
                backend = resolved.get((dev, requested))
                if backend is None:
                    backend = resolved[(dev, requested)] = resolve_backend(dev, requested)
                if backend == "torch":
                    group_torch.append(self._gather(p, g, group))
                else:
                    kernel_items.setdefault((dev, backend), []).append(self._gather_kernel(p, g, group, dev))
            if group_torch:
                torch_items.append((group, group_torch))
        for (dev, _), items in kernel_items.items():
            _k.check_launch(items[0].p, op=f"{type(self).__name__}.step")
            for it in items:
                if not it.p.is_contiguous():
                    it.work = it.p.contiguous()
            self._kernel_update(dev, items)
            # the kernels write raw memory, which autograd does not see: a graph that saved a parameter would
            # silently compute with the updated one where torch.optim's in-place ops make it raise
            increment_version([it.p for it in items if it.work is it.p])
            for it in items:
                if it.work is not it.p:
                    it.p.copy_(it.work)
            if self._mask_seen:  # the kernel wrote the state; the torch backend re-zeroes it once if it runs next
                for it in items:
                    self._mask_seen.pop(it.p, None)
        for group, items in torch_items:
            self._torch_group_update(group, items)
        return loss

    def _gather(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> _Item:
        """A parameter for the torch backend: its mask (checked), its state (created), contiguous tensors."""
        mask = param_mask(p)
        state = self.state[p]
        # fresh: no state tensor yet, so all the state this step starts from is zeros (respects any mask)
        fresh = not any(isinstance(v, torch.Tensor) for k, v in state.items() if k != "step")
        self._init_state(p, group, state)
        if not g.is_contiguous():
            g = g.contiguous()
        if mask is not None and not mask.is_contiguous():
            mask = mask.contiguous()
        for k, v in state.items():
            if k != "step" and isinstance(v, torch.Tensor) and not v.is_contiguous():
                state[k] = v.contiguous()
        if fresh:  # zero state respects any mask
            self._remember_mask(p, mask)
        return _Item(p, g, mask, group, state)

    def _gather_kernel(self, p: torch.Tensor, g: torch.Tensor, group: dict, dev: torch.device) -> _Item:
        """A parameter for the Triton kernels, which read raw memory: its mask (checked), its state (created, and
        checked: float32, the parameter's shape, contiguous, on its device), a contiguous gradient. Lean: this runs
        for every parameter at every step, and on a GPU a small model's step is host time."""
        mask = getattr(p, MASK_ATTR, None)
        if mask is not None:
            mask = param_mask(p)
            if not mask.is_contiguous():
                mask = mask.contiguous()
        state = self.state[p]
        self._init_state(p, group, state)
        if not g.is_contiguous():
            g = g.contiguous()
        for k, v in state.items():
            if k == "step" or not isinstance(v, torch.Tensor):
                continue
            if v.dtype is not torch.float32 or v.shape != p.shape or v.device != dev:
                raise ValueError(f"{type(self).__name__}: optimizer state {k!r} ({v.dtype}, {tuple(v.shape)}, "
                                 f"{v.device}) does not fit its parameter ({tuple(p.shape)}, {dev}); the state "
                                 "must be float32 of the parameter's shape on its device")
            if not v.is_contiguous():
                state[k] = v.contiguous()
        return _Item(p, g, mask, group, state)

    def _mask_bits(self, p: torch.Tensor, mask: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """torch backend on CPU: the mask as int32 0 / -1 (all bits set), cached per (mask object, version)."""
        rec = self._bits.get(p)
        version = _mask_key(mask)
        if rec is not None and version is not None and rec[0]() is mask and rec[1] == version:
            return rec[2]
        bits = live.to(torch.int32).neg_()
        self._bits[p] = (weakref.ref(mask), version, bits)
        return bits

    def _remember_mask(self, p: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is None:
            self._mask_seen.pop(p, None)
            return
        key = _mask_key(mask)
        if key is None:  # inference tensors have no version counter: never trust the record
            self._mask_seen.pop(p, None)
        else:
            self._mask_seen[p] = (weakref.ref(mask), key)

    def _mask_is_seen(self, p: torch.Tensor, mask: torch.Tensor) -> bool:
        rec = self._mask_seen.get(p)
        if rec is None or rec[0]() is not mask:
            return False
        key = _mask_key(mask)
        return key is not None and rec[1] == key

    def _torch_group_update(self, group: dict, items: list[_Item]) -> None:
        """The torch backend for one parameter group: per (device, dtype) bucket, fp32 work lists, foreach ops.

        Masked parameters: the gradient is masked (NaN-safe; on CPU in place, elsewhere into another tensor), the
        weight is zeroed at pruned positions before the update, and when the mask differs from the one the state
        last saw (a new IMP round) the state is zeroed there once. With p, the masked gradient and the state zero at pruned positions, the
        update keeps all of them exactly zero there, so no re-mask pass is needed after it (except Adam with
        eps == 0, where 0/0 would appear; then p is re-masked).
        """
        buckets: dict[tuple, list[_Item]] = {}
        for it in items:
            buckets.setdefault((it.p.device, it.p.dtype), []).append(it)
        for (_, dtype), bucket in buckets.items():
            work_p, work_g, lives = [], [], []
            for it in bucket:
                # fp32 contiguous work tensors (torch's fused kernels walk raw memory: layouts must agree)
                p32 = it.p if dtype == torch.float32 and it.p.is_contiguous() else it.p.float().contiguous()
                g32 = it.g if dtype == torch.float32 else it.g.float()
                live = None
                if it.mask is not None:
                    live = it.mask if it.mask.dtype == torch.bool else it.mask != 0
                    if g32.device.type == "cpu":
                        # On CPU torch.where is branchy (3-6x slower on a random 20-50 % mask than on a uniform
                        # one) and x * bool_mask is not vectorized; an AND with a 0 / -1 int32 mask is neither,
                        # and NaN-safe (it clears every bit). The int32 mask is made once per mask (version).
                        # The gradient is masked in place (as the dense-masking recipe does, and as a dense-path
                        # layer already did when it landed): a masking pass into another buffer moved ~1.7x the
                        # time (write-allocate of a second gradient-sized buffer; 10.5 against 6.3 ms for 16.8M
                        # floats, one thread).
                        bits = self._mask_bits(it.p, it.mask, live)
                        if not g32.is_contiguous():
                            g32 = g32.contiguous()
                        g32.view(torch.int32).bitwise_and_(bits)
                        p32.view(torch.int32).bitwise_and_(bits)
                    else:
                        g32 = torch.where(live, g32, _zero(g32.device))
                        _where_(p32, live)
                    if not self._mask_is_seen(it.p, it.mask):
                        for k, v in it.state.items():
                            if k != "step" and isinstance(v, torch.Tensor):
                                _where_(v, live)
                        self._remember_mask(it.p, it.mask)
                else:  # unmasked this step: its state may fill in, so a mask attached again re-zeroes it
                    self._mask_seen.pop(it.p, None)
                work_p.append(p32)
                work_g.append(g32)
                lives.append(live)
            self._torch_update(group, bucket, work_p, work_g, lives)
            for it, p32 in zip(bucket, work_p):
                if p32 is not it.p:
                    it.p.copy_(p32)

    # -- to be provided by each optimizer ------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Create missing state (zeros) that the update needs before it runs."""
        raise NotImplementedError

    def _kernel_update(self, device: torch.device, items: list[_Item]) -> None:
        """One step of ``items`` (all on ``device``, gathered by _gather_kernel) in few kernel launches."""
        raise NotImplementedError

    def _torch_update(self, group, items, work_p, work_g, lives) -> None:
        raise NotImplementedError

    def _use_fused(self, work_p: list[torch.Tensor], group: dict | None = None) -> bool:
        """torch backend: use torch's fused kernels (one pass; on CPU several times faster than foreach ops)?
        They are exact for our purpose because the gradient is already masked and p and the state are zero at
        pruned positions, which a plain update keeps zero. A capturable group uses them on every device."""
        impl = self.torch_impl
        if impl not in ("auto", "fused", "foreach"):
            raise ValueError(f"torch_impl must be 'auto', 'fused' or 'foreach', not {impl!r}")
        if impl == "auto":
            if group is not None and group.get("capturable"):
                return True
            return work_p[0].device.type == "cpu" and hasattr(torch, "_fused_adam_")
        return impl == "fused"


def _check_nonneg(name: str, value: float) -> None:
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not 0.0 <= value < float("inf"):  # (torch.optim takes inf, and a step then makes every weight inf or NaN)
        raise ValueError(f"Invalid {name}: {value}")


def _no_first_step_in_capture(p: torch.Tensor) -> None:
    """SGD's first step with momentum differs from the later ones (buf = d_p): a CUDA graph captured there would
    replay it at every step. Refused; warm up with at least one step before capturing."""
    if p.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("SGD: the first step with momentum (which creates the momentum buffer) is being captured "
                           "in a CUDA graph, which would replay it at every step; take a step before capturing")


class SGD(_MaskedOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay), mask-aware; see the module docstring.

    ``d_p = g + wd * p``; with momentum ``buf = d_p`` on the first step, then ``buf = momentum * buf +
    (1 - dampening) * d_p``; ``d_p = d_p + momentum * buf`` (Nesterov) or ``buf``; ``p -= lr * d_p``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, backend: str | None = None):
        for name, v in (("learning rate", lr), ("momentum value", momentum), ("dampening value", dampening),
                        ("weight_decay value", weight_decay)):
            _check_nonneg(name, v)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, backend=backend)
        super().__init__(params, defaults)

    def _init_state(self, p, group, state) -> None:
        # like torch.optim.SGD's, the buffer appears at the first step with momentum, which sets it to d_p
        pass

    def _kernel_update(self, device: torch.device, items: list[_Item]) -> None:
        # per group: (momentum?, nesterov?, hyper row, the row of a buffer's first step), in the kernel's layout
        group_rows: dict[int, tuple] = {}
        # per (momentum?, nesterov?): {(dtype, mask?, aligned): (pointer rows, hyper rows, -)}
        by_kind: dict[tuple[bool, bool], dict] = {}
        for it in items:
            grp = it.group
            hyp = group_rows.get(id(grp))
            if hyp is None:
                args = (grp["lr"], grp["weight_decay"], grp["momentum"], grp["dampening"])
                has_mom = float(grp["momentum"]) != 0
                hyp = group_rows[id(grp)] = (has_mom, bool(grp["nesterov"]) and has_mom,
                                             _k._sgd_hyper(*args, first=False), _k._sgd_hyper(*args, first=True))
            has_mom, nesterov, row, first_row = hyp
            buf = None
            if has_mom:
                buf = it.state.get("momentum_buffer")
                if buf is None:
                    _no_first_step_in_capture(it.p)
                    buf = it.state["momentum_buffer"] = _state_tensor(it.p)
                    row = first_row  # buf = d_p
            if it.p.numel() == 0:
                continue
            ptrs, aligned = _k.ptr_row(it.work, it.g, it.mask, buf)
            bucket = by_kind.setdefault((has_mom, nesterov), {}).setdefault(
                (it.p.dtype, it.mask is not None, aligned), ([], [], None))
            bucket[0].append(ptrs)
            bucket[1].append(row)
        for (has_mom, nesterov), buckets in by_kind.items():
            _k.launch_buckets("fused_sgd_", _k._sgd_kernel, device, buckets,
                              dict(HAS_MOMENTUM=has_mom, NESTEROV=nesterov))

    def _torch_update(self, group, items, work_p, work_g, lives) -> None:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        if self._use_fused(work_p):
            kw = dict(weight_decay=wd, momentum=momentum, lr=lr, dampening=dampening,
                      nesterov=bool(group["nesterov"]), maximize=False)
            if momentum == 0:
                torch._fused_sgd_(work_p, work_g, [], is_first_step=False, **kw)
                return
            is_first = [it.state.get("momentum_buffer") is None for it in items]
            for first in (True, False):  # a buffer's first step (buf = d_p) and the others: separate calls
                idx = [i for i in range(len(items)) if is_first[i] == first]
                if not idx:
                    continue
                if first:
                    for i in idx:
                        _no_first_step_in_capture(items[i].p)
                        items[i].state["momentum_buffer"] = _state_tensor(items[i].p)
                torch._fused_sgd_([work_p[i] for i in idx], [work_g[i] for i in idx],
                                  [items[i].state["momentum_buffer"] for i in idx], is_first_step=first, **kw)
            return
        d_p = torch._foreach_add(work_g, work_p, alpha=wd) if wd != 0 else work_g
        if momentum != 0:
            bufs, old_idx, old_bufs, old_dp = [], [], [], []
            for i, it in enumerate(items):
                buf = it.state.get("momentum_buffer")
                if buf is None:
                    _no_first_step_in_capture(it.p)
                    buf = it.state["momentum_buffer"] = d_p[i].detach().clone(memory_format=torch.contiguous_format)
                else:
                    old_idx.append(i)
                    old_bufs.append(buf)
                    old_dp.append(d_p[i])
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_dp, alpha=1 - dampening)
            if group["nesterov"]:
                d_p = torch._foreach_add(d_p, bufs, alpha=momentum)
            else:
                d_p = bufs
        torch._foreach_add_(work_p, d_p, alpha=-lr)


class Adam(_MaskedOptimizer):
    """torch.optim.Adam (bias correction, L2 weight decay, AMSGrad), mask-aware; see the module docstring.

    ``g += wd * p``; ``m = lerp(m, g, 1 - b1)``; ``v = b2 v + (1 - b2) g^2``; ``vmax = max(vmax, v)`` (AMSGrad);
    ``p -= lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)``.
    """

    _decoupled = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, backend: str | None = None,
                 capturable: bool = False):
        _check_nonneg("learning rate", lr)
        _check_nonneg("epsilon value", eps)
        _check_nonneg("weight_decay value", weight_decay)
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        backend=backend, capturable=bool(capturable))
        super().__init__(params, defaults)

    def _init_state(self, p, group, state) -> None:
        if "step" not in state:
            # capturable: the step count lives beside the parameter and only the device reads it
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group["capturable"] else None)
        elif group["capturable"] and state["step"].device != p.device:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if state.get(key) is None:
                state[key] = _state_tensor(p)

    def _step_tensors(self, items: list[_Item]) -> tuple[list[torch.Tensor], list[float | None]]:
        """Every item's step count incremented: (the step tensors, their new values; None for one not on the
        CPU). A non-capturable group inside a CUDA graph capture would freeze this step's bias corrections into
        the graph: refused, as torch.optim does.

        A step count on the CPU (every non-capturable one) is incremented through a NumPy view of its one float,
        kept per parameter while the state holds that tensor: an in-place torch op on a 0-d CPU tensor costs
        ~2.5 us (TensorIterator setup), ``_foreach_add_`` over a list as much per tensor, a NumPy scalar add
        0.1 us; Conv-6's 18 parameters paid ~50 us a step. The others (capturable groups' device tensors) take
        one ``_foreach_add_``."""
        if any(not it.group["capturable"] and it.p.is_cuda for it in items) and \
                torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{type(self).__name__}: a CUDA graph is being captured, but the optimizer's step "
                               "count lives on the host; build it with capturable=True")
        steps: list[torch.Tensor] = []
        values: list[float | None] = []
        on_device: list[torch.Tensor] = []
        views = self._step_views
        for it in items:
            step_t = it.state["step"]
            steps.append(step_t)
            if step_t.is_cpu:
                rec = views.get(id(it.p))  # by id: Tensor.__hash__ is a Python call; the identity check covers reuse
                if rec is None or rec[0] is not step_t or rec[2] != step_t.data_ptr():  # (.data / set_ moved it)
                    rec = views[id(it.p)] = (step_t, _scalar_view(step_t), step_t.data_ptr())
                view = rec[1]
                if view is not None:
                    view += 1  # in place: a 0-d array's augmented assignment writes its memory
                    values.append(float(view))
                    continue
                step_t.add_(1)
                values.append(float(step_t))
                continue
            on_device.append(step_t)
            values.append(None)
        if on_device:
            torch._foreach_add_(on_device, 1)
        return steps, values

    def _kernel_update(self, device: torch.device, items: list[_Item]) -> None:
        steps, step_values = self._step_tensors(items)
        group_rows: dict[int, tuple] = {}  # per group: (amsgrad?, capturable?, its values)
        host_rows: dict[tuple, tuple] = {}  # non-capturable: the fp32 row per (group, step count)
        # per (amsgrad?, capturable?): {(dtype, mask?, aligned): (pointer rows, hyper rows, fp64 hyper rows)}
        by_kind: dict[tuple[bool, bool], dict] = {}
        for it, step_t, step in zip(items, steps, step_values):
            grp = it.group
            hyp = group_rows.get(id(grp))
            if hyp is None:
                values = (float(grp["lr"]), float(grp["weight_decay"]), float(grp["betas"][0]),
                          float(grp["betas"][1]), float(grp["eps"]))
                rows = _k._adam_hyper_capturable(*values) if grp["capturable"] else None
                hyp = group_rows[id(grp)] = (bool(grp["amsgrad"]), bool(grp["capturable"]), values, rows)
            amsgrad, capturable, values, rows = hyp
            if capturable:
                row, row64, aux = rows[0], rows[1], step_t
            else:
                if step is None:  # a non-capturable step count on the device (made so by hand): read it
                    step = float(step_t)
                row = host_rows.get((id(grp), step))
                if row is None:
                    row = host_rows[(id(grp), step)] = _k._adam_hyper(*values, step)
                row64 = aux = None
            if it.p.numel() == 0:
                continue
            st = it.state
            ptrs, aligned = _k.ptr_row(it.work, it.g, it.mask, st["exp_avg"], st["exp_avg_sq"],
                                       st["max_exp_avg_sq"] if amsgrad else None, aux)
            bucket = by_kind.setdefault((amsgrad, capturable), {}).setdefault(
                (it.p.dtype, it.mask is not None, aligned), ([], [], []))
            bucket[0].append(ptrs)
            bucket[1].append(row)
            if capturable:
                bucket[2].append(row64)
        for (amsgrad, capturable), buckets in by_kind.items():
            _k.launch_buckets("fused_adam_", _k._adam_kernel, device, buckets,
                              dict(AMSGRAD=amsgrad, DECOUPLED=self._decoupled, CAPTURABLE=capturable),
                              hyper64_cols=_k._ADAM64_COLS if capturable else 0)

    def _torch_update(self, group, items, work_p, work_g, lives) -> None:
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        use_fused = self._use_fused(work_p, group)  # (refusals before the step counts move)
        if group["capturable"] and not use_fused:
            raise ValueError(f"{type(self).__name__}(capturable=True) on the torch backend runs torch's fused "
                             "kernels (they read the step count on the device); torch_impl='foreach' cannot")
        steps, values = self._step_tensors(items)
        if use_fused:
            fused = torch._fused_adamw_ if self._decoupled else torch._fused_adam_
            dev = work_p[0].device  # the steps live on the CPU; torch's fused CUDA kernels want them beside p
            fused_steps = steps if dev.type == "cpu" else [s.to(dev) for s in steps]
            fused(work_p, work_g, [it.state["exp_avg"] for it in items], [it.state["exp_avg_sq"] for it in items],
                  [it.state["max_exp_avg_sq"] for it in items] if group["amsgrad"] else [], fused_steps,
                  amsgrad=bool(group["amsgrad"]), lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                  maximize=False)
            if eps == 0:  # 0 / 0 at pruned positions
                for p32, live in zip(work_p, lives):
                    if live is not None:
                        _where_(p32, live)
            return
        if wd != 0:
            if self._decoupled:
                torch._foreach_mul_(work_p, 1 - lr * wd)
            else:
                work_g = torch._foreach_add(work_g, work_p, alpha=wd)
        exp_avgs = [it.state["exp_avg"] for it in items]
        exp_avg_sqs = [it.state["exp_avg_sq"] for it in items]
        torch._foreach_lerp_(exp_avgs, work_g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, work_g, work_g, 1 - beta2)
        step_values = [float(s) if v is None else v for s, v in zip(steps, values)]
        step_size = [-(lr / (1 - beta1 ** t)) for t in step_values]
        bias_correction2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in step_values]
        second = exp_avg_sqs
        if group["amsgrad"]:
            second = [it.state["max_exp_avg_sq"] for it in items]
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(work_p, exp_avgs, denom, step_size)
        if eps == 0:  # 0 / 0 at pruned positions
            for p32, live in zip(work_p, lives):
                if live is not None:
                    _where_(p32, live)


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay ``p *= 1 - lr * wd``), mask-aware; see the module docstring."""

    _decoupled = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, backend: str | None = None,
                 capturable: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         backend=backend, capturable=capturable)

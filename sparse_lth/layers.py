"""Drop-in sparse layers: :class:`SparseLinear`, :class:`SparseConv2d`, and :func:`sparsify` / :func:`densify`.

Each layer holds a boolean mask (buffer ``weight_mask``) and runs on one of two paths, chosen when its mask is set:

* **dense path**: the trainable parameter is the dense ``weight`` (exactly zero at pruned positions); products run
  on cuBLAS/cuDNN/MKL, and the weight gradient is masked in place as it lands in ``.grad``, so that any ``torch.optim``
  optimizer (momentum, weight decay, Adam state) keeps pruned weights at exactly zero. The mask is also attached to
  the Parameter as ``weight._sparse_lth_mask`` for mask-aware optimizers (:mod:`sparse_lth.optim`).
* **sparse path**: the trainable parameter is ``values``, the compact vector of live weights (CSR order), so
  gradients and optimizer state scale with the number of live weights and no optimizer can ever revive a pruned
  weight. Index structures are built on the layer's device when the mask changes, never per step (plain tensor
  attributes that follow the module's device moves, not buffers: see ``_INDEX_ATTRS``).

``path="auto"`` picks the faster path: on CUDA by timing both on the device (given an input shape seen by the
layer, see :func:`choose_paths`), on the CPU by the measured density crossover of the ``torch`` backend
(``benchmarks/``). The parameter set depends on the path: **build the optimizer after setting masks**.

On the sparse path each of the three ops (forward, input gradient, weight gradient) runs on the sparse kernels or
dense on the scattered live values (:mod:`sparse_lth.functional`); ``ops`` chooses: ``"auto"`` (the default) times
each op both ways when the path is timed on the device and keeps the fastest whole step, otherwise all ops are
sparse; ``"sparse"``, ``"dense"`` or a dict ``{op: "sparse" | "dense"}`` force it. ``layer.ops`` tells what runs.

``state_dict()`` always holds the dense ``weight`` and ``bias`` of the layer it replaced, plus ``weight_mask``;
a plain ``nn.Linear``/``nn.Conv2d`` loads it with ``strict=False`` (or strictly after :func:`strip_masks`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
import random
import statistics
import time
import warnings
import weakref

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .backend import resolve_backend
from .functional import (ALL_SPARSE, OPS, SparseConv2dFunction, SparseLinearFunction, check_ops, ops_dict,
                         scatter_values)
from .kernels.format import SparseFormat, _as_built, build_format, check_mask, to_values
from .kernels.torch_conv import build_conv_taps, channels_last, onednn_safe_input

__all__ = [
    "SparseLinear", "SparseConv2d", "LinearReLU", "sparsify", "densify", "sparse_layers", "choose_paths",
    "strip_masks", "parse_path_label", "parse_ops", "PATHS", "OPS", "CPU_LINEAR_SPARSE_MAX_DENSITY",
    "CPU_CONV_SPARSE_MAX_DENSITY", "CPU_CONV_SPARSE_MIN_IN_CHANNELS", "CUDA_SPARSE_MAX_DENSITY",
]

PATHS = ("auto", "dense", "sparse")


# Parameters sparse-lth replaced: an optimizer built before would step tensors the model no longer uses, so the
# weights would silently stop training while the biases go on. A global optimizer pre-step hook catches that.
# A sparse layer's own parameters, replaced when its mask or path changes, can be used by nothing else: the step
# raises. The layers that sparsify / densify swap out may still be used elsewhere on purpose (by a model left
# plain), so an optimizer holding their parameters gets a warning, once.
# {id: (weak reference, hard)}: tensors compare by value, so neither a WeakSet nor a WeakKeyDictionary can hold them.
_REPLACED: dict[int, tuple[weakref.ref, bool]] = {}


def _retire(params, hard: bool = True) -> None:
    for p in params:
        _REPLACED[id(p)] = (weakref.ref(p, lambda _, key=id(p): _REPLACED.pop(key, None)), hard)


def _refuse_replaced_parameters(optimizer, args, kwargs, what: str = "step") -> None:
    if not _REPLACED:
        return
    swapped = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _REPLACED.get(id(p))
            if entry is None or entry[0]() is not p:
                continue
            if entry[1]:
                raise RuntimeError(
                    f"{type(optimizer).__name__}.{what}(): it holds a {tuple(p.shape)} parameter that sparse-lth "
                    "replaced (a sparse layer gets new trainable parameters when its mask or path changes: "
                    "set_mask, load_state_dict with another mask, time_paths, restore_path, choose_paths), so it "
                    "would train a tensor the model no longer uses. "
                    "Build the optimizer after setting or loading masks.")
            swapped = p
    if what != "step":
        return
    if swapped is not None and not getattr(optimizer, "_sparse_lth_warned", False):
        optimizer._sparse_lth_warned = True
        warnings.warn(f"{type(optimizer).__name__}.step(): it holds a {tuple(swapped.shape)} parameter of a layer "
                      "that sparsify/densify swapped out of its model; unless that layer is still used elsewhere on "
                      "purpose, build the optimizer after sparsify/densify (and after setting masks)", stacklevel=3)


register_optimizer_step_pre_hook(_refuse_replaced_parameters)


def _check_optimizer_factory(optimizer) -> None:
    """The ``optimizer`` of the timed choice is a factory (a list of parameters -> an optimizer), not an optimizer."""
    if optimizer is None:
        return
    if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
        raise TypeError("optimizer must be a factory, a callable that takes a list of parameters and returns an "
                        "optimizer (e.g. lambda params: torch.optim.Adam(params, lr=1e-3)): the timed copies of a "
                        f"layer have parameters of their own; got {type(optimizer).__name__}")


def _built_optimizer(optimizer, params: list) -> object:
    opt = optimizer(params)
    if not callable(getattr(opt, "step", None)):
        raise TypeError(f"the optimizer factory returned {type(opt).__name__}, which has no step(); it must return "
                        "an optimizer over the parameters it is given")
    return opt


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _grad_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A dense-path layer's mask for its gradient hook: an integer of the weight's width per weight, all bits set
    where it is live and none where pruned, which the hook ANDs with the gradient's bits. As fast as a product with
    the weight-dtype 0/1 copy it replaces (a bool mask is ~4x slower on the CPU), and an inf or NaN gradient at a
    pruned entry becomes 0 where a product made NaN (and an optimizer then wrote NaN into the pruned weight)."""
    return mask.to(_BITS[torch.empty((), dtype=dtype).element_size()]).neg_()


def _under_transform(x: torch.Tensor, params: dict) -> bool:
    """Whether a :mod:`torch.func` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``hessian``...) is running, or
    forward-mode AD reaches the layer (a dual tensor among its input and ``params``, inside a
    ``torch.autograd.forward_ad.dual_level``). Then the sparse path computes the dense-masking product on its
    scattered live values with plain torch ops (its autograd Functions run kernels the transforms cannot trace, and
    define no jvp): the same function and derivatives as autograd gets from it, at dense cost. The dense path needs
    nothing more (``_dense_path_weight``)."""
    if _forward_ad._current_level >= 0 and any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in (x, *params.values())):
        return True
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())
# At or below these densities the torch backend's sparse path (forward + both gradients) beats the dense path on a
# 2-core CPU (benchmarks/bench_crossover_cpu.py, results in benchmarks/results/crossover_*cpu_*): CSR products for
# linear layers, shifted CSR products for conv layers (kernels/torch_conv.py). The conv rule holds for stride-1
# layers with at least CPU_CONV_SPARSE_MIN_IN_CHANNELS input channels: every 3x3 layer of Conv-6, ResNet-20 and
# VGG-19 measured wins at 3 % (>= 1.23x), and at 5 % all are at least even in two sessions (0.99-1.81x; at 7 % four
# lose, 0.86-0.98x: crossover_conv_near_cutoff_cpu_*), hence 5 % (notes/sparse_conv.md). A first layer (3
# channels: a memory-bound pass per kernel tap against a tiny dense conv) loses at every density, a strided one
# mostly breaks even or loses, so they stay dense unless timed.
CPU_LINEAR_SPARSE_MAX_DENSITY = 0.10
CPU_CONV_SPARSE_MAX_DENSITY = 0.05
CPU_CONV_SPARSE_MIN_IN_CHANNELS = 16
# Used on CUDA only until the layer has seen an input (after that, auto times both paths on the device).
CUDA_SPARSE_MAX_DENSITY = 0.05
# the index tensors of a SparseFormat, kept as the layer's buffers
_FMT_FIELDS = tuple(f.name for f in dataclasses.fields(SparseFormat) if f.name not in ("rows", "cols", "nnz"))


def _ops_request(ops):
    """"auto", or the per-op dense flags that ``ops`` forces (clear error on anything else)."""
    return "auto" if (isinstance(ops, str) and ops == "auto") else check_ops(ops)


def _ops_label(dense: tuple) -> str:
    """How the timings name a sparse-path configuration: "sparse", or e.g. "sparse/weight_grad:dense"."""
    return "sparse" + "".join(f"/{op}:dense" for op, d in zip(OPS, dense) if d)


def _path_label(path: str, dense_ops: tuple | None) -> str:
    """``layer.path_label`` of a configuration: "dense", or the sparse path's ``_ops_label``."""
    return "dense" if path == "dense" else _ops_label(dense_ops)


def parse_path_label(label: str) -> tuple[str, tuple | None]:
    """The inverse of ``layer.path_label``: ``"dense"`` -> ``("dense", None)``, ``"sparse"`` or e.g.
    ``"sparse/weight_grad:dense"`` -> ``("sparse", dense flags per op)``; anything else is refused clearly."""
    if label == "dense":
        return "dense", None
    parts = str(label).split("/")
    if parts[0] != "sparse":
        raise ValueError(f"not a path label: {label!r} (expected 'dense', 'sparse' or e.g. "
                         f"'sparse/weight_grad:dense')")
    dense = set()
    for part in parts[1:]:
        op, _, impl = part.partition(":")
        if op not in OPS or impl != "dense" or op in dense:
            raise ValueError(f"not a path label: {label!r} ({part!r}: expected one of "
                             f"{[o + ':dense' for o in OPS]}, each at most once)")
        dense.add(op)
    return "sparse", tuple(op in dense for op in OPS)


def parse_ops(text) -> str | dict:
    """``ops`` as a command line writes it: "auto", "sparse", "dense", or ``op=impl`` pairs separated by commas
    (e.g. "weight_grad=dense,forward=dense"); checked like the layers' ``ops`` argument."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    if t in ("auto", "sparse", "dense"):
        return t
    out = {}
    for item in t.split(","):
        op, sep, impl = item.partition("=")
        if not sep:
            raise ValueError(f"ops must be 'auto', 'sparse', 'dense' or op=impl pairs such as "
                             f"'weight_grad=dense,forward=dense'; got {text!r}")
        out[op.strip()] = impl.strip()
    _ops_request(out)  # the same checks (and messages) as the layers' ops=
    return out


# The sparse path's index structures (the CSR/CSC format and each live value's flat position) are plain tensor
# attributes, moved by _apply, not buffers: whatever treats every buffer as state (AveragedModel(use_buffers=True)
# averages them; functional_call over named_buffers()) would corrupt or substitute integer indices.
_INDEX_ATTRS = tuple(f"_fmt_{f}" for f in _FMT_FIELDS) + ("_flat_index",)


class _SparseLayer(nn.Module):
    """What SparseLinear and SparseConv2d share: mask, path, backend, formats, state_dict."""

    weight_shape: tuple

    @classmethod
    def from_dense(cls, module: nn.Module, mask=None, path: str = "auto", backend: str | None = None,
                   mask_gradients: bool = True, ops="auto"):
        """The sparse twin of a dense ``module`` (weights copied, ``requires_grad`` kept) under ``mask``; without
        one, under the module's own ``weight_mask`` buffer if it has one (a plain layer pruned by ``apply_masks`` or
        the pruner), else every weight live."""
        if mask is None and isinstance(module._buffers.get("weight_mask"), torch.Tensor):
            mask = module._buffers["weight_mask"]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._copy_geometry(module)
        layer.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(),
                                                                 requires_grad=module.bias.requires_grad)
        layer._setup(module.weight, mask, path, backend, mask_gradients, ops)
        return layer

    def _setup(self, weight: torch.Tensor, mask, path: str, backend: str | None, mask_gradients: bool,
               ops="auto") -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.ops_request = _ops_request(ops)
        self._dense_ops = ALL_SPARSE
        self.path_request = path
        self.backend_request = backend
        self.mask_gradients = mask_gradients
        self.path_timings: dict[str, float] = {}
        self.path_finalists: tuple[str, ...] = ()
        self._path = "dense"
        self._nnz = weight.numel()
        self._last_input_shape: tuple | None = None  # of a training forward (one with grad on) if any was seen
        self._last_input_batch_minor = False  # was that input (B, n) with strides (1, B), e.g. a sparse layer's output?
        self._last_input_requires_grad = True  # did it need a gradient (not a network's first layer)?
        self.register_parameter("weight", nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
        self.register_buffer("weight_mask", torch.ones(self.weight_shape, dtype=torch.bool, device=weight.device))
        self.set_mask(torch.ones_like(self.weight_mask) if mask is None else mask, path=path)

    # ------------------------------------------------------------------ inspection
    @property
    def mask(self) -> torch.Tensor:
        return self.weight_mask

    @property
    def path(self) -> str:
        return self._path

    @property
    def ops(self) -> dict[str, str]:
        """How each op (forward, input_grad, weight_grad) runs: "sparse" (the sparse kernels) or "dense" (a dense
        product; on the sparse path, on the scattered live values). On the dense path every op is dense."""
        return ops_dict((True,) * 3 if self._path == "dense" else self._dense_ops)

    @property
    def path_label(self) -> str:
        """The path, with the ops that the sparse path runs dense: "dense", "sparse", "sparse/weight_grad:dense"."""
        return _path_label(self._path, self._dense_ops)

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def density(self) -> float:
        n = math.prod(self.weight_shape)
        return self._nnz / n if n else 0.0

    @property
    def backend(self) -> str:
        return resolve_backend(self._buffers["weight_mask"].device, self.backend_request)

    @property
    def fmt(self) -> SparseFormat:
        if self._path != "sparse":
            raise AttributeError("the layer is on the dense path: it has no sparse format")
        d = self.__dict__
        f = d.get("_fmt_cache")
        # the index attributes are only ever replaced all together (a new mask, a device move): one identity check
        if f is None or f.row_ptr is not d.get("_fmt_row_ptr") or f.nnz != self._nnz:
            f = _as_built(SparseFormat(rows=self.weight_shape[0], cols=math.prod(self.weight_shape[1:]),
                                       nnz=self._nnz, **{n: d["_fmt_" + n] for n in _FMT_FIELDS}))
            d["_fmt_cache"] = f
        return f

    def __getattr__(self, name):
        if name == "weight" and "values" in self.__dict__.get("_parameters", {}):
            return self._scatter_weight()
        if name == "fmt" and self.__dict__.get("_path") == "dense":  # the property's AttributeError, said again
            raise AttributeError(f"{type(self).__name__} is on the dense path: it has no sparse format (fmt)")
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if self.__dict__.get("_is_replica") and name in ("weight", "values", "bias", "weight_mask"):
            # nn.DataParallel on several GPUs: its replicas hold parameters as plain attributes, which the layers'
            # paths do not read (the forward failed with KeyError 'weight'); DDP is torch's recommended way
            raise RuntimeError(f"{type(self).__name__} does not run under nn.DataParallel on several GPUs (its "
                               "replicas): use DistributedDataParallel (examples/imp_ddp.py), or one GPU")
        # on the sparse path `weight` is computed from `values`: a tensor set in its place (torch.func.functional_call
        # with a state_dict's "weight") would be ignored by forward, and torch puts the computed copy back as a
        # plain attribute after the call, which then hides the live weight and breaks a later move to the dense path
        if name == "weight" and "values" in self.__dict__.get("_parameters", {}):
            raise AttributeError(
                f"{type(self).__name__} is on the sparse path: its weight is computed from the live values "
                "(`values`, one per live weight, in the order of `weight_mask.nonzero()`), and cannot be set. "
                "Substitute `values` (e.g. torch.func.functional_call(layer, {'values': ...})), write a dense "
                "weight with set_dense_weight(), or put the layer on the dense path first "
                "(set_mask(layer.weight_mask, path='dense')).")
        if name == "weight_mask" and "weight_mask" in self.__dict__.get("_buffers", {}):
            # (as torch.nn.utils.prune's masks are set): the buffer changed while the live count, the index
            # structures, the gradient mask and the parameters kept the old mask
            raise AttributeError(f"{type(self).__name__}.weight_mask is set by set_mask(mask), which also rebuilds "
                                 "what the mask decides (the live values, the index structures, the gradient "
                                 "mask): call layer.set_mask(mask)")
        super().__setattr__(name, value)

    def _index_follows_mask(self) -> None:
        """Put the index structures on the mask's device if they are not (a module whose buffers were moved
        without ``_apply``: attributes are not buffers)."""
        t = self.__dict__.get("_flat_index")
        dev = self._buffers["weight_mask"].device
        if t is not None and t.device != dev:
            for name in _INDEX_ATTRS:
                self.__dict__[name] = self.__dict__[name].to(dev)
            self.__dict__.pop("_taps_cache", None)
            self.__dict__.pop("_fmt_cache", None)

    def _scatter_weight(self) -> torch.Tensor:
        return scatter_values(self._parameters["values"], self._flat_index, self.weight_shape)

    def _dense_path_weight(self) -> torch.Tensor:
        """The dense path's weight for ``forward``: the layer's own Parameter, whose hook masks the gradient that
        lands in ``.grad`` (registered here for a weight unfrozen since its hook was due). A tensor put in its place
        (``torch.func.functional_call``, under a transform or not) is masked (``torch.where``): the hook does not see
        it, ``torch.autograd.grad`` never fires it, and an update made outside the layer (a meta-learning inner
        step) may have revived pruned entries."""
        w = self._parameters["weight"]
        m = self.__dict__.get("_grad_mask")
        if getattr(w, "_sparse_lth_mask", None) is not self.weight_mask:
            if m is None or not self.mask_gradients:  # mask_gradients=False: pruned gradients left as they are
                return w
            return torch.where(self.weight_mask, w, 0)  # (a product made inf * 0 NaN)
        if w.requires_grad and m is not None and not getattr(w, "_sparse_lth_grad_hook", False):
            self._hook_dense_weight()
        return w

    def _copy_into_dense(self, m: nn.Module, w: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        m.weight.requires_grad_(self._current_requires_grad())
        if self.bias is not None:
            m.bias.requires_grad_(self.bias.requires_grad)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (zeros at pruned positions), differentiable with respect to the live weights."""
        if self._path == "dense":
            return self._parameters["weight"]
        return self._scatter_weight()

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Write the live entries from a dense tensor of the weight's shape; pruned entries stay zero."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {tuple(self.weight_shape)}")
        weight = weight.to(self.weight_mask.device)
        if self._path == "dense":
            p = self._parameters["weight"]
            # where, not a product: a non-finite weight at a pruned position becomes 0, not NaN (inf * 0)
            p.copy_(torch.where(self.weight_mask, weight, 0))
        else:
            self._parameters["values"].copy_(to_values(weight, self.weight_mask))

    # ------------------------------------------------------------------ masks and paths
    @torch.no_grad()
    def set_mask(self, mask, path: str | None = None, ops=None) -> None:
        """Set the mask (bool, or 0/1 values, of the weight's shape). Live weights keep their values, pruned
        ones become zero. ``path``: "auto", "dense" or "sparse" (default: the layer's ``path_request``);
        ``ops``: how the sparse path runs each op (see the module docstring; default: the layer's
        ``ops_request``). The trainable parameters are replaced: build the optimizer afterwards."""
        device = self.weight_mask.device
        if device.type == "meta" or getattr(mask, "device", None) == torch.device("meta"):
            raise ValueError("a sparse layer cannot live on the meta device: its layout depends on the mask's "
                             "values; build the model (or sparsify it) on a real device, or sparsify after "
                             "to_empty() and loading the weights")
        mask = check_mask(mask, self.weight_shape).to(device)
        path = self.path_request if path is None else path
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if ops is not None:
            self.ops_request = _ops_request(ops)
        backend = self.backend
        if path == "sparse":
            self._check_sparse_possible(backend)
        w = torch.where(mask, self.dense_weight().detach(), 0)  # pruned: 0, also where the weight is inf or NaN
        self._buffers["weight_mask"] = mask.clone()  # (assigning the attribute is refused: __setattr__)
        self._nnz = int(mask.sum())
        dense_ops = None
        if path == "auto":
            path, dense_ops = self._auto_path(backend)
        self._install(w, path, dense_ops)

    def _auto_path(self, backend: str) -> tuple[str, tuple | None]:
        """``(path, dense_ops)`` for ``path="auto"``; ``dense_ops`` None: the ``ops_request``'s default."""
        d = self.density
        if d >= 1.0 or not self._sparse_possible(backend):
            return "dense", None
        if backend == "triton":
            if self._choice_is_timed(backend):
                return self._time_paths(self._last_input_shape)
            return ("sparse" if d <= CUDA_SPARSE_MAX_DENSITY else "dense"), None
        limit = self._cpu_sparse_max_density()
        if self.weight_mask.device.type != "cpu" or limit is None:
            return "dense", None
        # by count: "at or below 5 %" takes the live count nearest 5 % of the weights (a density a rounding above
        # 0.05 stays in)
        return ("sparse" if self.nnz <= round(limit * self.weight_mask.numel()) else "dense"), None

    def _choice_is_timed(self, backend: str, timed: bool = False) -> bool:
        """Does ``path="auto"`` choose this layer's path by timing: on the Triton backend (or anywhere, given
        ``timed``) once the layer has seen an input, unless every weight is live (a sparse path cannot win there)
        or the backend cannot run its sparse path."""
        return ((timed or backend == "triton") and self.density < 1.0 and self._last_input_shape is not None
                and self._sparse_possible(backend))

    def _cpu_sparse_max_density(self) -> float | None:
        """The density at or below which the torch backend's sparse path beats the dense path on a CPU (None:
        never)."""
        return None

    def _sparse_possible(self, backend: str) -> bool:
        return True

    def _check_sparse_possible(self, backend: str) -> None:
        pass

    def _install(self, w: torch.Tensor, path: str, dense_ops: tuple | None = None) -> None:
        if dense_ops is None:
            req = self.ops_request
            dense_ops = req if isinstance(req, tuple) else ALL_SPARSE
        self._dense_ops = tuple(dense_ops)
        requires_grad = self._current_requires_grad()
        for name in ("weight", "values"):
            old = self._parameters.pop(name, None)
            if old is not None:
                _retire([old])
        has_bias = "bias" in self._parameters
        bias = self._parameters.pop("bias", None)
        for name in _INDEX_ATTRS + ("_grad_mask", "_fmt_cache"):
            self._buffers.pop(name, None)  # (index structures were buffers in modules saved before)
            self.__dict__.pop(name, None)
        mask = self.weight_mask
        if path == "dense":
            self.register_parameter("weight", nn.Parameter(w.contiguous(), requires_grad=requires_grad))
            if self._nnz < mask.numel():
                # the mask as bits for the gradient hook (see _grad_bits): a plain attribute, moved by _apply, not a
                # buffer (DDP broadcasts buffers, and neither gloo nor NCCL takes the int16 of a bf16 weight)
                self.__dict__["_grad_mask"] = _grad_bits(mask, w.dtype)
            self._hook_dense_weight()
        else:
            fmt = build_format(mask)
            for f in _FMT_FIELDS:
                setattr(self, "_fmt_" + f, getattr(fmt, f))  # plain attributes, see _INDEX_ATTRS
            flat = fmt.row_idx.long() * fmt.cols + fmt.col_idx.long()
            self._flat_index = flat
            self.register_parameter("values", nn.Parameter(to_values(w, mask), requires_grad=requires_grad))
        if has_bias:  # keep nn.Linear's parameter order: weight (or values), then bias
            self.register_parameter("bias", bias)
        self._path = path

    def _current_requires_grad(self) -> bool:
        p = self._parameters.get("weight", self._parameters.get("values"))
        return True if p is None else p.requires_grad

    @torch.no_grad()
    def time_paths(self, input_shape: tuple, reps: int = 10, optimizer=None) -> str:
        """Time every configuration of this layer (the dense path; the sparse path with each op sparse or dense,
        see ``_time_paths``) on its device for inputs of ``input_shape``, install the fastest, and return its
        ``path_label``. What ``path="auto"`` does by itself on CUDA once the layer has seen an input, here on
        demand and on any backend. Run it under the autocast context the layer will run under; the medians are
        in ``path_timings``. ``optimizer``: the training's optimizer as a factory, a callable from a list of
        parameters to an optimizer (``lambda ps: torch.optim.Adam(ps, lr=1e-3)``); each timed step then ends with
        its step over the configuration's parameters, which the sparse path runs over the live weights only and
        the dense path over all (left out, a small layer's sparse path is undervalued). The trainable parameters
        may be replaced: build the optimizer afterwards."""
        self._check_sparse_possible(self.backend)
        _check_optimizer_factory(optimizer)
        path, dense_ops = self._time_paths(tuple(input_shape), reps, optimizer)
        self._install(self.dense_weight().detach().clone(), path, dense_ops)
        return self.path_label

    @torch.no_grad()
    def restore_path(self, label: str) -> None:
        """Put the layer on the configuration a ``path_label`` names (e.g. one recorded in a checkpoint), keeping
        its mask, weights, ``path_request`` and ``ops_request``. The trainable parameters may be replaced: build
        the optimizer afterwards."""
        path, dense_ops = parse_path_label(label)
        if path == "sparse":
            self._check_sparse_possible(self.backend)
        if label != self.path_label:
            self._install(self.dense_weight().detach().clone(), path, dense_ops)

    def _per_op_choice(self) -> bool:
        """Can the sparse path run single ops dense (with this backend)? The torch conv path is dense already."""
        return True

    def _time_paths(self, input_shape: tuple, reps: int = 10, optimizer=None) -> tuple[str, tuple | None]:
        """Time forward+backward (and, given an ``optimizer`` factory, its step: see ``time_paths``) of the dense
        path and of the sparse path on the layer's device and return the faster as ``(path, dense_ops)``
        (``dense_ops`` None for the dense path). With ``ops_request == "auto"`` the sparse path is timed with all
        ops sparse and with each op flipped to dense alone, in one interleaved batch with the dense path; the flips
        that were faster than all-sparse are then combined and that combination is timed in a second batch against
        the first batch's winner, and the faster of those two is kept (else the first batch's fastest).
        ``path_timings`` holds every median (seconds; a configuration timed in both batches keeps its second
        figure), ``path_finalists`` the labels the choice was the fastest of (the second batch's two, or every
        one). The layer itself is not changed: every configuration runs on a copy."""
        dev = self.weight_mask.device
        dtype = self.dense_weight().dtype
        seen = tuple(input_shape) == self._last_input_shape
        # time the input gradient only if the layer's input needed one (a first layer's does not), unless nothing
        # else would need a backward pass
        input_grad = (self._last_input_requires_grad or not seen
                      or not any(p.requires_grad for p in self.parameters()))
        gen = torch.Generator(device=dev).manual_seed(0)  # its own: timing leaves the global RNG as it was
        if self._last_input_batch_minor and len(input_shape) == 2 and seen:
            # the layout the layer really gets: the sparse path reads a batch-minor input without a copy
            x = torch.randn(tuple(input_shape)[::-1], device=dev, dtype=dtype, generator=gen).t()
            x.requires_grad_(input_grad)
        else:
            x = torch.randn(input_shape, device=dev, dtype=dtype, generator=gen, requires_grad=input_grad)
        times: dict[str, float] = {}
        configs: dict[str, tuple | None] = {}
        final: list[str] = []  # the second batch's candidates, when there is one

        def measure(candidates: list[tuple[str, tuple | None]]) -> None:
            probes = {}
            for path, dense_ops in candidates:
                label = _path_label(path, dense_ops)
                probe = copy.deepcopy(self)
                for hooks in (probe._forward_pre_hooks, probe._forward_hooks, probe._backward_pre_hooks,
                              probe._backward_hooks):  # the user's hooks: not on random timing data
                    hooks.clear()
                probe._install(probe.dense_weight().detach().clone(), path, dense_ops)
                probes[label] = probe
                configs[label] = dense_ops
            times.update(self._time_steps(probes, x, reps, optimizer))

        if isinstance(self.ops_request, tuple):
            measure([("dense", None), ("sparse", self.ops_request)])
        else:
            flips = [tuple(j == i for j in range(len(OPS))) for i in range(len(OPS))] if self._per_op_choice() else []
            measure([("dense", None), ("sparse", ALL_SPARSE)] + [("sparse", f) for f in flips])
            base = times[_ops_label(ALL_SPARSE)]
            faster = [f for f in flips if times[_ops_label(f)] < base]
            if len(faster) > 1:
                best = min(times, key=times.get)
                combined = tuple(any(f[i] for f in faster) for i in range(len(OPS)))
                measure([("sparse", combined), ("dense" if best == "dense" else "sparse", configs[best])])
                # decided head to head within the second batch (figures of two batches are not comparable)
                final = [_ops_label(combined), best]
        self.path_timings = times
        self.path_finalists = tuple(final) if final else tuple(times)
        best = min(self.path_finalists, key=times.get)
        return ("dense", None) if best == "dense" else ("sparse", configs[best])

    @staticmethod
    def _time_steps(probes: dict[str, nn.Module], x: torch.Tensor, reps: int, optimizer=None) -> dict[str, float]:
        """Median seconds of a training step, ``probe(x).backward(dy)`` and, given an ``optimizer`` factory, the
        step of the optimizer it builds over the probe's trainable parameters, for each probe on x's device,
        interleaved: two warm-up rounds, then ``reps`` rounds that each run every probe once, in a
        (seeded) random order drawn anew every round, so that a drift of the clock or a burst of other work is
        spread over all candidates instead of landing on one, and no candidate always runs after the same
        neighbour (whose cache footprint or leftover work would bias it). ``dy`` is a dense random gradient in each
        probe's output layout (the same values for all), as a loss gives (``.sum().backward()`` would hand the
        kernels a stride-0 tensor of ones: every gather one address, a best case training never sees), drawn from
        its own generator; gradients are cleared before each step, as ``zero_grad()`` does, so none is timed
        accumulating."""
        dev = x.device
        labels = list(probes)
        order = random.Random(0)
        samples: dict[str, list[float]] = {label: [] for label in labels}
        dy0, dys = None, {}
        steps = {}  # label -> its optimizer's step (built before timing; its state is made in the warm-up rounds)
        if optimizer is not None:
            for label, probe in probes.items():
                params = [p for p in probe.parameters() if p.requires_grad]
                if params:
                    steps[label] = _built_optimizer(optimizer, params).step
        with torch.enable_grad():
            for i in range(reps + 2):
                order.shuffle(labels)
                for label in labels:
                    probe = probes[label]
                    for p in probe.parameters():
                        p.grad = None
                    x.grad = None
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    y = probe(x)
                    if label not in dys:  # in its first warm-up run: the same values, in this probe's layout
                        if dy0 is None:
                            dy0 = torch.empty(y.shape, device=dev, dtype=y.dtype).normal_(
                                generator=torch.Generator(device=dev).manual_seed(0))
                        dys[label] = torch.empty_like(y).copy_(dy0)
                    y.backward(dys[label])
                    if label in steps:
                        steps[label]()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if i >= 2:
                        samples[label].append(time.perf_counter() - t0)
        return {label: statistics.median(s) for label, s in samples.items()}

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor input, got {type(x).__name__}")
        if x.device != self._buffers["weight_mask"].device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device}, the layer on {self.weight_mask.device}")

    def _hook_dense_weight(self) -> None:
        """Dense path: attach the mask to ``weight`` (``weight._sparse_lth_mask``, for :mod:`sparse_lth.optim`) and,
        if the weight is pruned and trainable, register the hook that masks its gradient as it lands. Run when the
        weight is made, when the layer is rebuilt from its state (``copy.deepcopy`` and unpickling keep neither the
        attribute nor the hook), on device and dtype moves, and by ``forward`` for a weight unfrozen since (a hook
        cannot be put on a tensor that needs no gradient). Registers at most one hook per parameter."""
        p = self._parameters.get("weight")
        if p is None:
            return
        p._sparse_lth_mask = self.weight_mask
        if p.requires_grad and "_grad_mask" in self.__dict__ and not getattr(p, "_sparse_lth_grad_hook", False):
            p.register_post_accumulate_grad_hook(self._mask_accumulated_grad)
            p._sparse_lth_grad_hook = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in _INDEX_ATTRS + ("_grad_mask",):  # a module saved when these were buffers
            if name in self._buffers:
                self.__dict__[name] = self._buffers.pop(name)
        p = self._parameters.get("weight")
        if p is not None:  # unpickled: the attribute came back, the hook did not
            p._sparse_lth_grad_hook = False
            self._hook_dense_weight()
        self._match_grad_bits()  # (a module saved when the gradient mask was a float copy)
        if "kernel_size" in self.__dict__:  # a SparseConv2d made by unpickling (deepcopy, torch.load)
            _make_eager_conv()

    def _mask_accumulated_grad(self, p: torch.Tensor) -> None:
        """Dense path: zero the gradient at pruned positions in place, once it is accumulated into ``.grad``."""
        m = self.__dict__.get("_grad_mask")
        if self.mask_gradients and m is not None and p is self._parameters.get("weight") and p.grad is not None:
            if m.element_size() != p.grad.element_size():
                m = self._match_grad_bits()
            p.grad.view(m.dtype).bitwise_and_(m)  # an AND, not a product: an inf gradient at a pruned entry -> 0

    def _match_grad_bits(self) -> torch.Tensor | None:
        """The dense path's gradient mask as bits of the weight's width, made again where it is not (a dtype move
        keeps integer tensors as they are; a module saved with the older float copy), and returned."""
        m, w = self.__dict__.get("_grad_mask"), self._parameters.get("weight")
        if m is not None and w is not None and (m.is_floating_point() or m.element_size() != w.element_size()):
            m = self.__dict__["_grad_mask"] = _grad_bits(self.weight_mask, w.dtype)
        return m

    # ------------------------------------------------------------------ device moves and state_dict
    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_fmt_cache", None)

        def move(t: torch.Tensor) -> torch.Tensor:
            # .to(), .half(), .cuda() leave integer and bool tensors' dtype alone, but Module.type() casts every
            # tensor: the index structures and the masks only follow the device (an fp16 column index rounds
            # above 2048, and the kernels would read other weights)
            out = fn(t)
            if out.dtype != t.dtype and not t.is_floating_point() and not t.is_complex():
                return t.to(out.device)
            return out

        for name in _INDEX_ATTRS + ("_grad_mask",):  # moved with the module
            t = self.__dict__.get(name)
            if isinstance(t, torch.Tensor):
                self.__dict__[name] = move(t)
        w = self._parameters.get("weight")
        impl = w._cdata if w is not None else None
        out = super()._apply(move, *args, **kwargs)
        w = self._parameters.get("weight")
        if w is not None and w._cdata != impl and w._post_accumulate_grad_hooks is not None:
            # the weight's tensor was swapped in under the same Parameter object (torch.utils.swap_tensors: under
            # torch.__future__.set_swap_module_params_on_conversion(True), and for tensor subclasses): the Python
            # object kept its dict of post-accumulate hooks, the gradient mask's among them, but autograd runs
            # them from the tensor, and the new one has none. Setting the dict again registers it there (and
            # whether the mask's hook is in it is read from the dict: the object's attributes are the new tensor's).
            hooks = w._post_accumulate_grad_hooks
            w._post_accumulate_grad_hooks = hooks
            w._sparse_lth_grad_hook = any(h == self._mask_accumulated_grad for h in hooks.values())
        self._hook_dense_weight()
        self._match_grad_bits()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.dense_weight()
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight_mask"] = self.weight_mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        known = {"weight", "bias", "weight_mask"}
        for key in state_dict:
            if key.startswith(prefix) and strict:
                rest = key[len(prefix):].split(".", 1)  # as nn.Module: a dotted key belongs to a child module
                if (rest[0] not in self._modules) if len(rest) > 1 else (rest[0] not in known):
                    unexpected_keys.append(key)
        wkey, bkey, mkey = prefix + "weight", prefix + "bias", prefix + "weight_mask"
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        w = state_dict[wkey]
        if tuple(w.shape) != tuple(self.weight_shape):
            error_msgs.append(f"size mismatch for {wkey}: copying a param with shape {tuple(w.shape)}, "
                              f"the shape in current model is {tuple(self.weight_shape)}.")
            return
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            elif tuple(state_dict[bkey].shape) != tuple(self.bias.shape):
                error_msgs.append(f"size mismatch for {bkey}: copying a param with shape "
                                  f"{tuple(state_dict[bkey].shape)}, the shape in current model is "
                                  f"{tuple(self.bias.shape)}.")
                return
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
        elif bkey in state_dict and strict:
            unexpected_keys.append(bkey)
        try:
            mask = state_dict.get(mkey, self.weight_mask)
            with torch.no_grad():
                if not torch.equal(check_mask(mask, self.weight_shape).to(self.weight_mask.device),
                                   self.weight_mask):
                    self.set_mask(mask)
                self.set_dense_weight(w)
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{mkey}: {e}")


class SparseLinear(_SparseLayer):
    """A drop-in ``nn.Linear`` whose weight is masked; see the module docstring.

    ``activation="relu"`` fuses a ReLU into the layer (into the Triton kernel's epilogue on the sparse path).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 mask=None, path: str = "auto", backend: str | None = None, activation: str | None = None,
                 mask_gradients: bool = True, ops="auto"):
        super().__init__()
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._copy_geometry(ref)
        self.activation = activation
        self.bias = ref.bias
        self._setup(ref.weight, mask, path, backend, mask_gradients, ops)

    def _copy_geometry(self, ref: nn.Linear) -> None:
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.activation = getattr(ref, "activation", None)
        self.weight_shape = tuple(ref.weight.shape)

    def to_dense_module(self) -> nn.Linear:
        """The plain ``nn.Linear`` with this layer's (masked) weights and ``requires_grad``; with
        ``activation="relu"``, a :class:`LinearReLU` (the same outputs, the same state_dict keys)."""
        w = self.dense_weight().detach()
        cls = LinearReLU if self.activation == "relu" else nn.Linear
        m = cls(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        self._copy_into_dense(m, w)
        return m

    def _cpu_sparse_max_density(self) -> float | None:
        return CPU_LINEAR_SPARSE_MAX_DENSITY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features in its last dimension, "
                             f"expected {self.in_features} (input shape {tuple(x.shape)})")
        transform = _under_transform(x, self._parameters)
        d = self.__dict__  # plain attributes: written without nn.Module.__setattr__'s checks (every forward)
        if not transform and (torch.is_grad_enabled() or d.get("_last_input_shape") is None):  # not an evaluation's
            d["_last_input_shape"] = tuple(x.shape)
            d["_last_input_batch_minor"] = x.dim() == 2 and x.shape[0] > 1 and x.stride(0) == 1
            d["_last_input_requires_grad"] = x.requires_grad or not torch.is_grad_enabled()  # unknown: True
        if self._path == "dense" or transform:
            if self._path != "dense":
                self._index_follows_mask()
            w = self._dense_path_weight() if self._path == "dense" else self._scatter_weight()
            y = F.linear(x, w, self.bias)
            return torch.relu(y) if self.activation == "relu" else y
        self._index_follows_mask()
        values, bias = self._parameters["values"], self._parameters.get("bias")
        x, values, bias = _autocast_operands("SparseLinear", x, values, bias)
        # the Function itself: this layer has checked what sparse_linear() would (its format when the mask was set)
        return SparseLinearFunction.apply(x, values, bias, self.fmt, self.backend, self.activation, self._dense_ops,
                                          self._flat_index)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{act}, density={self.density:.4f}, path={self.path_label}")


def _autocast_operands(layer: str, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None):
    """The sparse path's operands as autocast gives them to F.linear / F.conv2d: under autocast every floating
    operand but a float64 one goes to the autocast dtype (a float64 layer fed float32 stays a mismatch, refused as
    nn.Linear refuses it); the input and the weight must then have one dtype."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, values = (t if t.dtype == torch.float64 else t.to(dt) for t in (x, values))
        if bias is not None and bias.dtype != torch.float64:
            bias = bias.to(dt)
    if x.dtype != values.dtype:
        raise TypeError(f"{layer}: input dtype {x.dtype} differs from the weight's {values.dtype}")
    return x, values, bias


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# The CPU sparse conv, run eagerly under ``torch.compile``: traced, its loop over kernel taps (one CSR product each)
# split the graph at every tap, recompiled per tap index up to dynamo's recompile limit and ran slower than eager (one
# graph break instead). Made when the first SparseConv2d is (``torch.compiler.disable`` imports torch._dynamo, ~0.8 s
# that importing this module should not cost), so it exists before any compile traces a forward.
_EAGER_CONV = None


def _make_eager_conv() -> None:
    global _EAGER_CONV
    if _EAGER_CONV is None:
        _EAGER_CONV = torch.compiler.disable(SparseConv2dFunction.apply)


class SparseConv2d(_SparseLayer):
    """A drop-in ``nn.Conv2d`` whose weight is masked; see the module docstring.

    The sparse path (Triton kernels on CUDA, shifted CSR products of ``kernels/torch_conv.py`` on the torch
    backend) supports ``groups=1`` with zero padding given as integers; other configurations run on the dense
    path, or, forced onto the torch sparse path, as a dense convolution of the scattered live weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 mask=None, path: str = "auto", backend: str | None = None, mask_gradients: bool = True,
                 ops="auto"):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                        padding_mode, device=device, dtype=dtype)
        self._copy_geometry(ref)
        self.bias = ref.bias
        self._setup(ref.weight, mask, path, backend, mask_gradients, ops)

    def _copy_geometry(self, ref: nn.Conv2d) -> None:
        _make_eager_conv()
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "_reversed_padding_repeated_twice"):
            v = getattr(ref, a)
            # Python ints: nn.Conv2d keeps numpy integers as given (np.int64(3)), which its own ops take and the
            # sparse path's geometry checks refused at the first forward
            if a in ("in_channels", "out_channels", "groups"):
                v = operator.index(v)
            elif a in ("kernel_size", "stride", "dilation") or (a == "padding" and not isinstance(v, str)):
                v = tuple(operator.index(e) for e in v)
            setattr(self, a, v)
        self.weight_shape = tuple(ref.weight.shape)

    def to_dense_module(self) -> nn.Conv2d:
        w = self.dense_weight().detach()
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, self.bias is not None, self.padding_mode, device=w.device,
                      dtype=w.dtype)
        self._copy_into_dense(m, w)
        return m

    def _triton_geometry_ok(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def _sparse_possible(self, backend: str) -> bool:
        return backend == "torch" or self._triton_geometry_ok()

    def _per_op_choice(self) -> bool:
        return self._triton_geometry_ok()  # the torch backend's other geometries: a scatter and a dense conv

    def _cpu_sparse_max_density(self) -> float | None:
        if (self._triton_geometry_ok() and self.in_channels >= CPU_CONV_SPARSE_MIN_IN_CHANNELS
                and _pair(self.stride) == (1, 1)):
            return CPU_CONV_SPARSE_MAX_DENSITY
        return None

    def _install(self, w: torch.Tensor, path: str, dense_ops: tuple | None = None) -> None:
        super()._install(w, path, dense_ops)
        self._taps_cache = None

    def _taps(self):
        """The torch backend's per-tap grouping of the format (built at the first sparse forward after a mask or
        device change)."""
        taps = self.__dict__.get("_taps_cache")
        if taps is None or taps.device != self.weight_mask.device:
            taps = build_conv_taps(self.fmt, _pair(self.kernel_size))
            self._taps_cache = taps
        return taps

    def _check_sparse_possible(self, backend: str) -> None:
        if not self._sparse_possible(backend):
            raise ValueError(f"SparseConv2d: the {backend} sparse path needs groups=1 and integer zero padding "
                             f"(got groups={self.groups}, padding={self.padding!r}, "
                             f"padding_mode={self.padding_mode!r}); use path='dense' or backend='torch'")

    def _conv(self, x, w, bias):
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        grad = w.requires_grad and torch.is_grad_enabled()  # (the weight gradient is where oneDNN goes wrong)
        safe = onednn_safe_input(x, self.kernel_size, self.stride) if grad else x
        y = F.conv2d(safe, w, bias, self.stride, padding, self.dilation, self.groups)
        if safe is not x and channels_last(x):  # the layout nn.Conv2d gives a channels_last input
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        transform = _under_transform(x, self._parameters)
        d = self.__dict__  # plain attributes: written without nn.Module.__setattr__'s checks (every forward)
        if not transform and (torch.is_grad_enabled() or d.get("_last_input_shape") is None):  # not an evaluation's
            d["_last_input_shape"] = tuple(x.shape)
            d["_last_input_requires_grad"] = x.requires_grad or not torch.is_grad_enabled()  # unknown: True
        if self._path != "dense":
            self._index_follows_mask()
        if self._path == "dense" or transform:
            w = self._dense_path_weight() if self._path == "dense" else self._scatter_weight()
            return self._conv(x, w, self.bias)
        backend = self.backend
        if not self._triton_geometry_ok():  # forced sparse on the torch backend, then moved to CUDA: not a Triton case
            return self._conv(x, self._scatter_weight(), self.bias)
        values, bias = self._parameters["values"], self._parameters.get("bias")
        x, values, bias = _autocast_operands("SparseConv2d", x, values, bias)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        taps = self._taps() if backend == "torch" else None
        apply = _EAGER_CONV if backend == "torch" and _EAGER_CONV is not None else SparseConv2dFunction.apply
        y = apply(x, values, bias, self.fmt, _pair(self.kernel_size), _pair(self.stride), _pair(self.padding),
                  _pair(self.dilation), self._dense_ops, self._flat_index, backend, taps)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", density={self.density:.4f}, path={self.path_label}"


# ---------------------------------------------------------------------- whole models
class LinearReLU(nn.Linear):
    """``nn.Linear`` then a ReLU, in one module with ``nn.Linear``'s parameters and state_dict keys: what
    :func:`densify` gives back for a ``SparseLinear(activation="relu")``, and what :func:`sparsify` turns into
    one."""

    activation = "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _swap_target(module: nn.Module):
    """The sparse twin of exactly ``nn.Linear``, :class:`LinearReLU` and ``nn.Conv2d``; a subclass (its own
    forward, extra parameters, a lazy layer) is left alone rather than replaced by something else."""
    if type(module) in (nn.Linear, LinearReLU):
        return SparseLinear
    if type(module) is nn.Conv2d:
        return SparseConv2d
    return None


def _reparametrized(module: nn.Module) -> str:
    """Why a Linear/Conv2d's weight is not its own parameter (its sparse twin would copy the computed weight and
    drop the reparametrization), or ""."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return ""
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module):
        return "its weight is parametrized (torch.nn.utils.parametrize)"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return "its weight is computed by a hook (weight_norm, spectral_norm), not a parameter of its own"
    return ""


def sparsify(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, path: str = "auto",
             backend: str | None = None, ops="auto") -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (in place) for its sparse twin; return the model.

    ``masks``: optional ``{module_name: mask}``; ``path``, ``backend``, ``ops``: as for the layers. Linear layers
    inside ``nn.MultiheadAttention`` (which reads their weights directly) are left alone, and so are subclasses
    (their own forward or parameters). A layer used under several names gets one twin (a mask under any of its
    names). A layer whose weight or bias is tied to another module (a language model's output layer sharing the
    embedding's weight, say) is left alone too, with a warning: its twin would copy the weight and silently
    untie it; a mask for it is an error. So is a layer whose weight is reparametrized (``weight_norm``,
    ``spectral_norm``, ``torch.nn.utils.parametrize``): its twin would copy the computed weight and drop the
    reparametrization. A bare ``nn.Linear``/``nn.Conv2d`` is returned swapped.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    masks = dict(masks or {})
    why = _reparametrized(model)
    if why:
        warnings.warn(f"sparsify: left the {type(model).__name__} plain: {why}", stacklevel=2)
        return model
    target = _swap_target(model)
    if target is not None:
        return target.from_dense(model, masks.pop("", None), path=path, backend=backend, ops=ops)
    # a module reached under several names (a shared container): a mask may be keyed by any of them
    first: dict[int, str] = {}
    alias = {}
    for n, m in model.named_modules(remove_duplicate=False):
        alias[n] = first.setdefault(id(m), n)
    for k in [k for k in masks if alias.get(k, k) != k]:
        mask, to = masks.pop(k), alias[k]
        if to in masks and not torch.equal(check_mask(masks[to], mask.shape).cpu(), check_mask(mask, mask.shape).cpu()):
            raise ValueError(f"sparsify: {k} is the same layer as {to}, with another mask")
        masks.setdefault(to, mask)
    tied, left_alone = _tied_layers(model), set()
    swapped: dict[int, tuple[nn.Module, str]] = {}  # a layer used in several places gets one sparse twin
    originals: list[nn.Module] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            continue
        for child_name, child in list(module._modules.items()):  # every name, also a repeated module's
            full = f"{name}.{child_name}" if name else child_name
            why = _reparametrized(child)
            if why:
                if masks.pop(full, None) is not None:
                    raise ValueError(f"sparsify: {full} cannot take a mask: {why}")
                if id(child) not in left_alone:  # once per layer
                    left_alone.add(id(child))
                    warnings.warn(f"sparsify: left {full} a plain {type(child).__name__}: {why}", stacklevel=2)
                continue
            target = _swap_target(child)
            if target is None:
                continue
            mask = masks.pop(full, None)
            if id(child) in tied:
                mine, other = tied[id(child)]
                if mask is not None:
                    raise ValueError(f"sparsify: {full} cannot take a mask: its parameter {mine} is tied to {other}, "
                                     "and a sparse twin would untie them")
                if id(child) not in left_alone:  # once per layer
                    left_alone.add(id(child))
                    warnings.warn(f"sparsify: left {full} a plain {type(child).__name__}: its parameter {mine} is "
                                  f"tied to {other}, and a sparse twin would copy it and untie them", stacklevel=2)
                continue
            if id(child) in swapped:
                twin, first = swapped[id(child)]
                if mask is not None:
                    if first is None:
                        twin.set_mask(mask)
                        swapped[id(child)] = (twin, full)
                    elif not torch.equal(check_mask(mask, twin.weight_shape).cpu(), twin.weight_mask.cpu()):
                        raise ValueError(f"sparsify: {full} is the same layer as {first}, with another mask")
                setattr(module, child_name, twin)
                continue
            twin = target.from_dense(child, mask, path=path, backend=backend, ops=ops)
            swapped[id(child)] = (twin, None if mask is None else full)
            originals.append(child)
            setattr(module, child_name, twin)
    if masks:
        modules = dict(model.named_modules())
        already = sorted(k for k in masks if isinstance(modules.get(k), _SparseLayer))
        if already:
            raise ValueError(f"sparsify: {already} are sparse layers already: set their masks with "
                             "layer.set_mask(mask), or sparse_lth.imp.apply_masks(model, masks) for all at once")
        raise KeyError(f"sparsify: masks given for modules that are not Linear/Conv2d layers: {sorted(masks)}")
    _retire_swapped(model, originals)
    return model


def _tied_layers(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``{id(layer): (its parameter's name, the other module's name for it)}`` for the Linear/Conv2d layers of
    ``model`` that share a weight or bias Parameter with another module."""
    owners: dict[int, dict[int, str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), {}).setdefault(id(m), f"{n}.{pn}" if n else pn)
    tied = {}
    for n, m in model.named_modules():
        if _swap_target(m) is None:
            continue
        for pn in ("weight", "bias"):
            p = m._parameters.get(pn)
            others = [v for k, v in owners.get(id(p), {}).items() if k != id(m)] if p is not None else []
            if others:
                tied[id(m)] = (f"{n}.{pn}", others[0])
                break
    return tied


def _retire_swapped(model: nn.Module, old_modules) -> None:
    """Mark (softly) the parameters of swapped-out layers that the model no longer reaches (a tied one is kept)."""
    alive = {id(p) for p in model.parameters()}
    _retire((p for m in old_modules for p in m.parameters() if id(p) not in alive), hard=False)


def densify(model: nn.Module) -> nn.Module:
    """Swap every sparse layer of ``model`` (in place) back for a plain ``nn.Linear``/``nn.Conv2d`` with the
    masked weights (pruned ones 0) and no mask: a plain model, to export. To go on pruning or training it with
    its masks, keep the sparse layers (or put the masks back with ``sparse_lth.imp.apply_masks``)."""
    if isinstance(model, _SparseLayer):
        return model.to_dense_module()
    twins: dict[int, nn.Module] = {}  # a layer used in several places gets one dense twin
    swapped_out: list[nn.Module] = []
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if isinstance(child, _SparseLayer):
                if id(child) not in twins:
                    twins[id(child)] = child.to_dense_module()
                    swapped_out.append(child)
                setattr(module, child_name, twins[id(child)])
    _retire_swapped(model, swapped_out)
    return model


def sparse_layers(model: nn.Module) -> list[tuple[str, _SparseLayer]]:
    """The sparse layers of ``model`` as ``(name, layer)`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SparseLayer)]


@torch.no_grad()
def choose_paths(model: nn.Module, example_input: torch.Tensor, timed: bool = False,
                 optimizer=None) -> dict[str, str]:
    """Run ``model`` once on ``example_input`` so every layer sees its input shape, then let each layer with
    ``path_request == "auto"`` choose its path again (on CUDA: by timing the dense path and the sparse path, the
    latter with each op on the kernels or dense, see :meth:`_SparseLayer.time_paths`). Returns ``{name: path}``;
    ``layer.path_label`` / ``layer.ops`` tell which ops a sparse layer runs dense. ``timed=True`` times every
    such layer whatever its backend (on the CPU too, where "auto" otherwise goes by density), except a layer with
    every weight live, which stays dense as ``path="auto"`` keeps it (a sparse path cannot win there, and timing
    it can take seconds per call). ``optimizer``: the training's optimizer as a factory (a list of parameters ->
    an optimizer, e.g. ``lambda ps: torch.optim.Adam(ps, lr=1e-3)``), whose step each timed step then includes
    (see :meth:`_SparseLayer.time_paths`). Build the optimizer afterwards."""
    _check_optimizer_factory(optimizer)
    flags = [(m, m.training) for m in model.modules()]  # each module's own (a BatchNorm kept in eval stays so)
    model.eval()
    try:
        with torch.enable_grad():  # so that each layer sees whether its input needs a gradient (a first layer's not)
            model(example_input)
    finally:
        for m, training in flags:
            m.training = training
    out = {}
    for name, layer in sparse_layers(model):
        if layer.path_request == "auto":
            # timed as set_mask's "auto" times (on the Triton backend), here with the optimizer's step
            if layer._choice_is_timed(layer.backend, timed):
                layer.time_paths(layer._last_input_shape, optimizer=optimizer)
            else:
                layer.set_mask(layer.weight_mask)
        out[name] = layer.path
    return out


def strip_masks(state_dict: dict) -> dict:
    """A copy of ``state_dict`` without the ``weight_mask`` entries: strictly loadable by the dense model."""
    out = type(state_dict)((k, v) for k, v in state_dict.items() if not k.endswith("weight_mask"))
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata
    return out

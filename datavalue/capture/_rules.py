"""Per-layer rules that turn a layer's input and output gradient into per-sample gradients.

A rule sees, for one call of a module, the inputs saved by a forward hook and the gradient of
the loss with respect to the module's output (a tensor hook). It never runs a second backward.

* ``Linear`` (any leading dims), ``Conv1d``/``Conv2d`` (groups=1, zero padding) and ``Embedding``
  are *Kronecker* rules: the per-sample gradient of the weight matrix (bias as an appended input
  column) is ``sum_t d_t a_t^T``; each side is projected before the sum over tokens/positions.
* ``LayerNorm`` and the ``torch.func`` *fallback* (any other module with trainable parameters)
  produce dense per-sample gradients that are projected with one Gaussian matrix.

Extend with your own rule::

    @LAYER_RULES.register(MyLayer)
    class MyRule(LayerRule): ...

Registering a type twice raises unless ``overwrite=True``.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datavalue.errors import CaptureError


@dataclass(frozen=True)
class BlockDraft:
    """A block a rule asks for: which parameters, how they are laid out."""

    key: str  # identity used to merge tied parameters (name of the primary parameter)
    params: tuple[str, ...]  # qualified parameter names, in layout order
    kind: str  # "kron" or "dense"
    shape: tuple[int, ...]  # (rows, cols) for kron, (n,) for dense
    has_bias: bool = False
    bias_axis: int = 1  # kron: bias appended as a last column (1, Linear) or a last row (0, HF Conv1D)


#: A side whose sketch's row count is not a multiple of this is applied as ``P @ X^T`` rather than
#: ``X @ P^T`` (the same numbers up to float rounding). CPU sgemm kernels are tiled for an output width
#: of 16 floats (AVX-512): ``X @ P^T`` pays for a whole tile per started 16 columns, so a narrow or
#: ragged output ran slower than ``P @ X^T`` on this project's CPU, and a multiple of 16 faster:
#: ``(1024, 512) @ (512, k)`` against ``(k, 512) @ (512, 1024)``, thread time, one thread: k = 8 4.0x
#: slower, 12 1.7x, **16 0.98x**, 17 1.39x, 20 1.29x, 24 1.21x, 31 1.80x, **32 1.04x**, 33 1.16x,
#: **48 1.06x**, **64 1.00x**, 65 1.18x; the same pattern for inner sizes 128 to 2,048 and 128 or
#: 1,024 rows (GPT-2's tied LM head ``(1024, 2048) @ (2048, 8)``: 2.9 ms against 0.8 ms; its sides at
#: proj_dim 4096 have 16 and 17 rows). See docs/results/capture.md (issue 20).
NARROW = 16


def _project(x: torch.Tensor, P: torch.Tensor, P_t: torch.Tensor) -> torch.Tensor:
    """``x @ P^T`` over the last axis, ``(..., dim) -> (..., k)``; the result may be a transposed
    view (``P @ x^T``, see :data:`NARROW`)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(P, x2.t()).t() if P.shape[0] % NARROW else torch.mm(x2, P_t)
    return y.reshape(*x.shape[:-1], P.shape[0])


def _project_affine(x: torch.Tensor, P: torch.Tensor, P_t: torch.Tensor) -> torch.Tensor:
    """``[x, 1] @ P^T`` (a constant 1 appended to the last axis) without materialising ``[x, 1]``."""
    x2 = x.reshape(-1, x.shape[-1])
    if P.shape[0] % NARROW:
        y = torch.addmm(P[:, -1:], P[:, :-1], x2.t()).t()
    else:
        y = torch.addmm(P_t[-1], x2, P_t[:-1])
    return y.reshape(*x.shape[:-1], P.shape[0])


#: The input-side memo of the hook running on this thread (set by ``Engine._on_grad`` around a rule's
#: ``per_sample``; ``active`` is ``None`` otherwise): ``(memo, storages)``. A block with ``curvature="fisher"`` runs every
#: captured layer's rule once per pseudo-gradient pass and once in the real backward, on the same saved
#: inputs: the input side of each layer (``X P^T``: 0.88 of 1.63 ms per step of sketch GEMMs on the benchmark
#: MLP with sampled labels) is then computed once per block instead of once per pass (issue 20, sixth pass).
_ACTIVE = threading.local()


def storage_address(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or ``None`` for a tensor without a plain one (sparse, nested, a
    subclass): those are never memoised."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _side(sk: Sketch, tag: str, x: torch.Tensor, compute: Any) -> torch.Tensor:
    """``compute(x)``, memoised while a hook's memo is active and ``x`` views one of the layer's saved inputs.

    The key holds everything the result depends on: the sketch and the method, ``x``'s storage address,
    offset, shape, strides and dtype, and its version counter (an in-place edit of the input in between
    bumps it, shared with every view and the detached copy). The entry keeps ``x`` alive, so no other
    tensor can take its address while the entry exists; the engine drops the memo when the block ends.
    Gradient-side inputs (another storage in every pass) are never memoised.
    """
    active = getattr(_ACTIVE, "active", None)
    if active is None:
        return compute(x)
    memo, storages = active
    ptr = storage_address(x)
    if ptr is None or ptr not in storages:
        return compute(x)
    key = (id(sk), tag, ptr, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x._version)
    hit = memo.get(key)
    if hit is not None:
        return hit[1]
    y = compute(x)
    memo[key] = (x, y)
    return y


class Sketch:
    """Projection of one block, as torch tensors on the model's device and dtype.

    ``rows``/``cols`` are ``(k, dim)`` matrices or ``None`` (identity, exact). For dense blocks
    only ``rows`` is used.
    """

    def __init__(self, kind: str, rows: torch.Tensor | None, cols: torch.Tensor | None, k: int) -> None:
        self.kind, self.k = kind, k
        # both orientations contiguous, so the hot path is one plain GEMM (see NARROW)
        self.rows = rows.contiguous() if rows is not None else None
        self.cols = cols.contiguous() if cols is not None else None
        self.rows_t = rows.T.contiguous() if rows is not None else None
        self.cols_t = cols.T.contiguous() if cols is not None else None

    def left(self, d: torch.Tensor) -> torch.Tensor:
        """Project the row side: ``(..., rows) -> (..., k_rows)``."""
        return d if self.rows is None else _side(self, "l", d, lambda x: _project(x, self.rows, self.rows_t))

    def left_affine(self, a: torch.Tensor) -> torch.Tensor:
        """Project ``[a, 1]`` on the row side (a bias as an appended last row of the block)."""
        if self.rows is None:
            return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        return _side(self, "la", a, lambda x: _project_affine(x, self.rows, self.rows_t))

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """Project the column side: ``(..., cols) -> (..., k_cols)``."""
        return a if self.cols is None else _side(self, "r", a, lambda x: _project(x, self.cols, self.cols_t))

    def right_affine(self, a: torch.Tensor) -> torch.Tensor:
        """Project ``[a, 1]`` (bias as an appended constant input) without materialising it."""
        if self.cols is None:
            return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        return _side(self, "ra", a, lambda x: _project_affine(x, self.cols, self.cols_t))

    def left_columns(self, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        """``P_rows e_index`` for integer indices (one-hot inputs of an Embedding)."""
        if self.rows is None:
            return F.one_hot(index, n_rows).to(self._dtype())
        return self.rows_t[index]

    def dense(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.rows is None else _project(v, self.rows, self.rows_t)

    def _dtype(self) -> torch.dtype:
        m = self.rows if self.rows is not None else self.cols
        return m.dtype if m is not None else torch.get_default_dtype()


def kron_sum(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_t left[b,t,:] (x) right[b,t,:]`` flattened: ``(b,L,kr),(b,L,kc) -> (b, kr*kc)``."""
    b = left.shape[0]
    if left.shape[1] == 1:  # one position (an MLP's Linear): an outer product; bmm of 1-deep products is 8x slower
        return (left[:, 0, :, None] * right[:, 0, None, :]).reshape(b, -1)
    return torch.bmm(left.transpose(1, 2), right).reshape(b, -1)


class LayerRule(abc.ABC):
    """How one module type yields per-sample gradients. Subclass and register to extend."""

    #: name shown by ``datavalue.inspect``
    name: str = "rule"
    #: whether :meth:`per_sample` also handles a Kronecker draft's bias as its own ``"dense"`` draft
    #: (``BlockDraft(bias, (bias,), "dense", (rows,))`` beside the weight's draft without the bias),
    #: which the engine uses when the weight and the bias sit in param groups with different
    #: hyperparameters (``Engine(..., optimizer=...)``)
    splits_bias: bool = False

    def supports(self, module: nn.Module) -> bool:  # noqa: ARG002
        """Whether this rule can handle this instance (else the fallback is used)."""
        return True

    @abc.abstractmethod
    def drafts(self, module: nn.Module, prefix: str, tied: set[str]) -> list[BlockDraft]:
        """Blocks for the module's own trainable parameters (``tied``: names shared elsewhere)."""

    @abc.abstractmethod
    def per_sample(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grad_out: torch.Tensor,
        sketches: dict[str, Sketch],
        drafts: list[BlockDraft],
    ) -> dict[str, torch.Tensor]:
        """``{draft.key: (b, k) projected per-sample gradient}`` for one call of the module."""


class RuleRegistry:
    """Maps module types to rules; refuses silent overwrite."""

    def __init__(self) -> None:
        self._rules: dict[type, LayerRule] = {}
        self._by_name: dict[str, LayerRule] = {}

    def register(self, module_type: type, *, overwrite: bool = False):
        def deco(rule_cls: type[LayerRule]) -> type[LayerRule]:
            if module_type in self._rules and not overwrite:
                raise ValueError(
                    f"a rule for {module_type.__name__} is already registered "
                    f"({type(self._rules[module_type]).__name__}); pass overwrite=True to replace it."
                )
            self._rules[module_type] = rule_cls()
            return rule_cls

        return deco

    def register_by_name(self, qualname: str, *, overwrite: bool = False):
        """Register a rule for a type named ``"package.module.Class"`` without importing it."""

        def deco(rule_cls: type[LayerRule]) -> type[LayerRule]:
            if qualname in self._by_name and not overwrite:
                raise ValueError(f"a rule for {qualname} is already registered; pass overwrite=True to replace it.")
            self._by_name[qualname] = rule_cls()
            return rule_cls

        return deco

    def lookup(self, module: nn.Module) -> LayerRule | None:
        """Exact type match first, then the nearest registered base class."""
        rule = self._by_name.get(f"{type(module).__module__}.{type(module).__qualname__}")
        if rule is not None and rule.supports(module):
            return rule
        for cls in type(module).__mro__:
            rule = self._rules.get(cls)
            if rule is not None and rule.supports(module):
                return rule
            if rule is not None:
                return None
        return None


LAYER_RULES = RuleRegistry()


def _trainable(module: nn.Module, prefix: str, names: tuple[str, ...]) -> list[str]:
    out = []
    for n in names:
        p = getattr(module, n, None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            out.append(f"{prefix}{n}")
    return out


@LAYER_RULES.register(nn.Linear)
class LinearRule(LayerRule):
    """``y = x W^T + b`` over any leading dims: Kronecker ``(out) x (in + 1)``."""

    name = "linear"
    splits_bias = True

    def drafts(self, module, prefix, tied):
        w = f"{prefix}weight"
        params = _trainable(module, prefix, ("weight", "bias"))
        has_bias = f"{prefix}bias" in params
        if w not in params:
            return [BlockDraft(f"{prefix}bias", (f"{prefix}bias",), "dense", (module.out_features,))] if has_bias else []
        if has_bias and w in tied:  # a tied weight keeps the shared layout; the bias stands alone
            return [
                BlockDraft(w, (w,), "kron", (module.out_features, module.in_features)),
                BlockDraft(f"{prefix}bias", (f"{prefix}bias",), "dense", (module.out_features,)),
            ]
        return [BlockDraft(w, tuple(params), "kron", (module.out_features, module.in_features + has_bias), has_bias)]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        a = args[0]
        b = a.shape[0]
        a = a.reshape(b, -1, a.shape[-1])
        d = grad_out.reshape(b, -1, grad_out.shape[-1])
        out = {}
        for dr in drafts:
            sk = sketches[dr.key]
            if dr.kind == "dense":  # lone bias
                out[dr.key] = sk.dense(d.sum(1))
                continue
            out[dr.key] = kron_sum(sk.left(d), sk.right_affine(a) if dr.has_bias else sk.right(a))
        return out


@LAYER_RULES.register_by_name("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(LayerRule):
    """Hugging Face GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``(in, out)``.

    Kronecker ``(in + 1) x (out)``: rows are the activation side, the bias is an appended row.
    """

    name = "hf_conv1d"
    splits_bias = True

    def drafts(self, module, prefix, tied):
        w = f"{prefix}weight"
        params = _trainable(module, prefix, ("weight", "bias"))
        if w not in params or w in tied:
            return []
        has_bias = f"{prefix}bias" in params
        n_in, n_out = module.weight.shape
        return [BlockDraft(w, tuple(params), "kron", (n_in + has_bias, n_out), has_bias, bias_axis=0)]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        a = args[0]
        b = a.shape[0]
        a = a.reshape(b, -1, a.shape[-1])
        d = grad_out.reshape(b, -1, grad_out.shape[-1])
        out = {}
        for dr in drafts:
            sk = sketches[dr.key]
            if dr.kind == "dense":  # the bias as its own block (param groups that step differently)
                out[dr.key] = sk.dense(d.sum(1))
                continue
            out[dr.key] = kron_sum(sk.left_affine(a) if dr.has_bias else sk.left(a), sk.right(d))
        return out


class _ConvRule(LayerRule):
    dims = 2
    splits_bias = True

    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def drafts(self, module, prefix, tied):
        w = f"{prefix}weight"
        params = _trainable(module, prefix, ("weight", "bias"))
        if w not in params or w in tied:
            return []  # handled by the fallback
        has_bias = f"{prefix}bias" in params
        cols = module.weight[0].numel() + has_bias
        return [BlockDraft(w, tuple(params), "kron", (module.out_channels, cols), has_bias)]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        x = args[0]
        if self.dims == 1:
            x, g = x.unsqueeze(-2), grad_out.unsqueeze(-2)
            ks, st, pd, dl = (1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]), (1, module.dilation[0])
        else:
            g = grad_out
            ks, st, pd, dl = module.kernel_size, module.stride, module.padding, module.dilation
        b = x.shape[0]
        d = g.reshape(b, g.shape[1], -1).transpose(1, 2)  # (b, L, out)
        dr = drafts[0]
        sk = sketches[dr.key]
        extra = {}
        if len(drafts) > 1:  # the bias as its own block (param groups that step differently)
            extra = {drafts[1].key: sketches[drafts[1].key].dense(d.sum(1))}
        if sk.cols is not None:
            # the column sketch of the unfolded patches is itself a convolution with the sketch rows
            # as filters: (b, k_c, L) straight from x, without materialising the (b, L, in*k) patches
            n_in = sk.cols.shape[1] - dr.has_bias
            filt = sk.cols[:, :n_in].reshape(sk.cols.shape[0], x.shape[1], *ks)
            right = F.conv2d(x, filt, sk.cols[:, n_in] if dr.has_bias else None, stride=st, padding=pd, dilation=dl)
            return {dr.key: kron_sum(sk.left(d), right.reshape(b, right.shape[1], -1).transpose(1, 2)), **extra}
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st).transpose(1, 2)  # (b, L, in*k)
        if dr.has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[:-1] + (1,))], -1)
        return {dr.key: kron_sum(sk.left(d), sk.right(cols)), **extra}


@LAYER_RULES.register(nn.Conv2d)
class Conv2dRule(_ConvRule):
    """2-d convolution as a Linear over unfolded patches (groups=1, zero padding)."""

    name = "conv2d"
    dims = 2


@LAYER_RULES.register(nn.Conv1d)
class Conv1dRule(_ConvRule):
    """1-d convolution as a Linear over unfolded patches (groups=1, zero padding)."""

    name = "conv1d"
    dims = 1


@LAYER_RULES.register(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Lookup table: gradient row ``token`` gets ``d``; Kronecker ``(vocab) x (dim)``."""

    name = "embedding"

    def supports(self, module):
        return not module.sparse and module.max_norm is None

    def drafts(self, module, prefix, tied):
        w = f"{prefix}weight"
        if w not in _trainable(module, prefix, ("weight",)):
            return []
        return [BlockDraft(w, (w,), "kron", (module.num_embeddings, module.embedding_dim))]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        idx = args[0]
        b = idx.shape[0]
        idx = idx.reshape(b, -1)
        d = grad_out.reshape(b, idx.shape[1], -1)
        if module.padding_idx is not None:
            d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
        dr = drafts[0]
        sk = sketches[dr.key]
        left = sk.left_columns(idx, module.num_embeddings).to(d.dtype)
        return {dr.key: kron_sum(left, sk.right(d))}


@LAYER_RULES.register(nn.LayerNorm)
class LayerNormRule(LayerRule):
    """Elementwise affine after normalisation: dense ``[sum d*xhat, sum d]``."""

    name = "layernorm"

    def drafts(self, module, prefix, tied):
        params = _trainable(module, prefix, ("weight", "bias"))
        if not params or any(p in tied for p in params):
            return []
        n = sum(int(torch.Size(module.normalized_shape).numel()) for _ in params)
        return [BlockDraft(params[0], tuple(params), "dense", (n,))]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        x = args[0]
        b = x.shape[0]
        nd = len(module.normalized_shape)
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        d = grad_out
        red = tuple(range(1, x.dim() - nd))
        parts = []
        dr = drafts[0]
        for p in dr.params:
            v = d * xhat if p.endswith("weight") else d
            parts.append((v.sum(red) if red else v).reshape(b, -1))
        return {dr.key: sketches[dr.key].dense(torch.cat(parts, 1))}


#: Modules whose forward uses their children's parameters without calling the children
#: (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly): the fallback takes all their
#: parameters, recursively, and their children are not hooked.
OPAQUE_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


class FallbackRule(LayerRule):
    """Any module with its own trainable parameters: per-sample VJP with ``torch.func``.

    Re-runs the module's forward per example under ``vmap`` (so the module must treat examples
    independently, e.g. no BatchNorm in training mode), differentiating only its *own*
    parameters with the recorded output gradient as cotangent.
    """

    name = "fallback(torch.func)"

    def drafts(self, module, prefix, tied):
        recurse = isinstance(module, OPAQUE_MODULES)
        named = [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]
        if not named:
            return []
        n = sum(p.numel() for _, p in named)
        return [BlockDraft(f"{prefix}{named[0][0]}", tuple(f"{prefix}{k}" for k, _ in named), "dense", (n,))]

    def per_sample(self, module, args, kwargs, grad_out, sketches, drafts):
        from torch.func import functional_call, vjp, vmap

        dr = drafts[0]
        all_params = dict(module.named_parameters(recurse=isinstance(module, OPAQUE_MODULES)))
        local = [n for n, p in all_params.items() if p.requires_grad]
        params = {k: all_params[k].detach() for k in local}
        b = grad_out.shape[0]
        in_dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == b else None for a in args)

        def one(x_args, g):
            def f(p):
                xs = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(x_args, in_dims))
                out = functional_call(module, p, xs, kwargs)
                if not torch.is_tensor(out):
                    out = out[0]
                return out

            _, pull = vjp(f, params)
            (gp,) = pull(g.unsqueeze(0))
            return torch.cat([gp[k].reshape(-1) for k in local])

        try:
            flat = vmap(one, in_dims=(in_dims, 0))(args, grad_out)
        except Exception as exc:
            if batch_coupled(module):  # the usual cause, said first (P5-24)
                raise CaptureError(f"{type(module).__name__} cannot be captured per example: {BATCH_COUPLED}") from exc
            raise CaptureError(
                f"the torch.func fallback failed on {type(module).__name__}: {exc}. Register a LayerRule for it "
                "(datavalue.capture.LAYER_RULES.register) or exclude it with layers=[...]."
            ) from exc
        return {dr.key: sketches[dr.key].dense(flat)}


FALLBACK = FallbackRule()

#: Why a batch norm layer in training mode has no per-example gradient, and what to do.
BATCH_COUPLED = (
    "batch norm in training mode (or without running statistics) normalises each example with the mean and "
    "variance of its whole batch, so an example's loss depends on the other examples of the batch and its affine "
    "parameters have no per-example gradient. Fixes: put the batch norm layers in eval mode while training "
    "(frozen running statistics, usual when fine-tuning: bn.eval() after model.train()); or use GroupNorm / "
    "LayerNorm; or freeze their affine parameters (bn.weight.requires_grad_(False), bn.bias.requires_grad_(False)) "
    "or leave them out with layers=[...], then the other layers are recorded, but their rows still carry the batch "
    "coupling (each is the example's share of the batch gradient through the batch statistics)."
)


def batch_coupled(module: nn.Module) -> bool:
    """Whether ``module`` normalises with its batch's statistics (BatchNorm in training mode, or
    without running statistics) and has trainable affine parameters: no per-example gradient."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return (isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats)
            and any(p.requires_grad for p in module.parameters(recurse=False)))

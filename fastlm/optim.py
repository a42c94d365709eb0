"""Optimizers for training: AdamW, or Muon for the hidden matrices with AdamW for the rest.

:class:`Muon` (Keller Jordan's "MomentUm Orthogonalized by Newton-Schulz") keeps a momentum buffer per
2-D weight and applies its orthogonalised direction. It follows the conventions of
``torch.optim.Muon`` (torch >= 2.13) so the two can be compared number for number:

* momentum ``buf <- lerp(buf, g, 1 - mu)``; Nesterov update ``lerp(g, buf, mu)`` (else ``buf``);
* ``O = NS_k(update)``: ``k`` quintic Newton-Schulz iterations ``X <- a X + (b A + c A^2) X`` with
  ``A = X X^T``, coefficients ``(3.4445, -4.7750, 2.0315)``, on the wide orientation (a tall matrix
  is transposed), after ``X <- X / max(||X||_F, eps)``;
* decoupled weight decay ``W <- W (1 - lr wd)``, then ``W <- W - lr sqrt(max(1, rows / cols)) O``
  (torch's ``adjust_lr_fn="original"``: an update of the same RMS per column for any aspect ratio).

What differs is the cost: matrices of one shape are stacked and orthogonalised together as batched
matmuls (``torch.bmm``/``baddbmm`` on ``(N, m, n)``), so the default 3-layer model runs 4 batched
Newton-Schulz runs instead of 12 single ones; in float32/64 a matrix more than 1.5x wider than high
runs the same polynomial in its Gram form (m x m matmuls, 37% fewer flops at the default shapes;
error ~1e-4 of an update entry, bounded, vs ~2e-6 for the direct fp32 form and ~5e-2 for bf16); and
the precision is a setting: ``ns_dtype="auto"`` is float32 on CPU (there faster than bf16 and far
more accurate, measured) and bfloat16 on CUDA. That PyTorch form is the reference, and what runs on
GPUs. On CPU, float32/float64 parameters whose Newton-Schulz dtype is their own take the fused C++
op ``fastlm::muon_step_`` (csrc/cpu/muon.cpp; ``fused=None``, the default, picks it where it applies):
the same arithmetic per matrix, but every matrix runs start to finish on one thread with
single-threaded BLAS calls, with no dispatch, stacking or separate elementwise passes between them.
At the default model's shapes (about 0.47 GFLOP per step) that took 1.9-2.6x less time than the
PyTorch form in side-by-side runs (benchmarks/REPORT.md, optimizer step rows).

:func:`build_optimizer` makes the parameter groups of a :class:`fastlm.model.GPT` and returns ONE
object with ``param_groups`` / ``state`` / ``step`` / ``zero_grad`` / ``state_dict`` /
``load_state_dict``, so ``GradScaler``, ``clip_grad_norm_`` and fastlm's checkpoints treat both
choices alike. Every group carries ``lr_ratio``: its peak learning rate over the AdamW one, so a
schedule sets ``group["lr"] = scheduled_lr * group["lr_ratio"]``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import Tensor

__all__ = ["Muon", "MuonWithAdamW", "OPTIMIZERS", "adamw_kwargs", "build_optimizer", "newton_schulz",
           "newton_schulz_many", "muon_param_names"]

OPTIMIZERS = ("adamw", "muon")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def newton_schulz(G: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of ``G`` ``(N, rows, cols)``: ``U S' V^T`` with
    ``S'`` near 1 for ``G = U S V^T``. Computed in ``dtype``; returned in ``dtype``, shape of ``G``.

    In float32/float64 a matrix wider than 1.5x its height (after orienting it wide) takes the Gram
    form (:func:`_gram_polynomial`), the same polynomial in fewer flops; otherwise the direct
    iteration on ``X``."""
    return newton_schulz_many([G], steps, coefficients, dtype, eps)[0]


def newton_schulz_many(stacks: list, steps: int = 5, coefficients=NS_COEFFICIENTS,
                       dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> list:
    """:func:`newton_schulz` of each ``(N_i, rows_i, cols_i)`` stack, results in the same order.
    Gram-form stacks whose short side ``m`` is the same run their ``m x m`` polynomial as ONE batched
    iteration (the default model: its 9 wide matrices of 3 shapes share m = 96), so the optimizer
    step issues a third of the small matmuls; each matrix's arithmetic is the same as alone."""
    out = [None] * len(stacks)
    gram = defaultdict(list)  # m -> [(position, oriented X, tall)]
    for pos, G in enumerate(stacks):
        if G.dim() != 3:
            raise ValueError(f"newton_schulz expects a (N, rows, cols) stack, got shape {tuple(G.shape)}")
        tall = G.size(1) > G.size(2)
        X = G.to(dtype)
        if tall:
            X = X.mT
        X = X / X.norm(dim=(1, 2), keepdim=True).clamp_min(eps)
        m, n = X.shape[1:]
        if dtype in (torch.float32, torch.float64) and 2 * n > 3 * m and steps > 1:
            gram[m].append((pos, X, tall))
        else:
            X = _newton_schulz_direct(X, steps, coefficients)
            out[pos] = X.mT if tall else X
    for items in gram.values():
        A = torch.cat([torch.bmm(X, X.mT) for _, X, _ in items])  # (sum N, m, m)
        Qs = _gram_polynomial(A, steps, coefficients).split([X.size(0) for _, X, _ in items])
        for (pos, X, tall), Q in zip(items, Qs):
            X = torch.bmm(Q, X)
            out[pos] = X.mT if tall else X
    return out


def _newton_schulz_direct(X: Tensor, steps: int, coefficients) -> Tensor:
    """``X <- a X + (b A + c A^2) X`` with ``A = X X^T``: per step 4 m^2 n + 2 m^3 flops (X: m x n)."""
    a, b, c = coefficients
    for _ in range(steps):
        A = torch.bmm(X, X.mT)  # (N, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def _gram_polynomial(A: Tensor, steps: int, coefficients) -> Tensor:
    """The Gram form of the iteration: every iterate is ``Q X_0`` with ``Q`` a polynomial in
    ``A_0 = X_0 X_0^T``, so ``P_k = a + b A_k + c A_k^2``, ``Q_{k+1} = P_k Q_k`` and
    ``A_{k+1} = P_k A_k P_k`` (all commute); returns ``Q`` (the caller forms ``Q X_0``, so ``X_0`` is
    touched twice). Flops: 4 m^2 n + (8 steps - 6) m^3, fewer than the direct form when n > 1.5 m.
    Needs float32/64: A squares the singular values."""
    a, b, c = coefficients
    Q = None
    for k in range(steps):
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=1, dim2=2).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if k + 1 < steps:
            A = torch.bmm(torch.bmm(P, A), P)
    return Q


def resolve_ns_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be auto or one of {', '.join(NS_DTYPES)}, got {name!r}")
    return NS_DTYPES[name]


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, same-shape matrices orthogonalised as one batch (see the module doc).

    Group options: ``lr``, ``momentum`` (0.95), ``nesterov`` (True), ``weight_decay`` (0), ``ns_steps``
    (5), ``ns_coefficients``, ``ns_dtype`` ("auto" | "float32" | "bfloat16" | "float64"), ``eps``,
    ``fused`` (None: the C++ op where it applies, else the PyTorch form; True: the op or an error;
    False: the PyTorch form). State per parameter: ``momentum_buffer`` (the parameter's shape and dtype).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_coefficients=NS_COEFFICIENTS,
                 ns_dtype: str = "auto", eps: float = 1e-7, fused: Optional[bool] = None):
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"Muon lr must be a finite number >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 < ns_steps < 100:
            raise ValueError(f"Muon ns_steps must be an integer in [1, 99], got {ns_steps!r}")
        resolve_ns_dtype(ns_dtype, "cpu")  # validates the name
        if fused not in (None, True, False):
            raise ValueError(f"Muon fused must be None (where it applies), True or False, got {fused!r}")
        if len(tuple(ns_coefficients)) != 3:
            raise ValueError(f"Muon ns_coefficients must be (a, b, c), got {ns_coefficients!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype, eps=eps,
                        fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes only 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self._fused_step(group):
                continue
            batches = list(self._same_shape_batches(group))
            updates = [self._momentum_update(group, params) for params in batches]
            # one Newton-Schulz call per (device, dtype) of the group: same-m Gram stacks run together
            by_kind = defaultdict(list)
            for i, params in enumerate(batches):
                by_kind[(params[0].device, params[0].dtype)].append(i)
            for (device, _), idx in by_kind.items():
                dtype = resolve_ns_dtype(group["ns_dtype"], device.type)
                orthos = newton_schulz_many([updates[i] for i in idx], group["ns_steps"],
                                            tuple(group["ns_coefficients"]), dtype, group["eps"])
                for i, ortho in zip(idx, orthos):
                    self._apply(group, batches[i], ortho)
        return loss

    def _fused_step(self, group) -> bool:
        """The group's step as one ``fastlm::muon_step_`` call where it applies (``fused`` None) or is
        asked for (True: an error where it does not); False: the PyTorch form below runs."""
        fused = group.get("fused")
        if fused is False:
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return False
        from ._ext import CPP_BACKEND  # (the extension is optional)

        grads = [p.grad for p in params]
        reason = None
        if any(g.is_sparse for g in grads):
            reason = "sparse gradients"
        elif params[0].device.type != "cpu":
            reason = f"the op is CPU-only, the parameters are on {params[0].device}"
        elif resolve_ns_dtype(group["ns_dtype"], "cpu") != params[0].dtype:
            reason = (f"the Newton-Schulz dtype ({group['ns_dtype']}) must resolve to the parameters' "
                      f"dtype ({params[0].dtype}) on CPU")
        if reason is None:
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            reason = CPP_BACKEND.muon_step_unsupported(params, grads, bufs)
        if reason is not None:
            if fused is True:
                raise RuntimeError(f"Muon(fused=True) cannot run the fused step here: {reason}")
            return False
        CPP_BACKEND.muon_step(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                              nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                              ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"],
                              eps=group["eps"])
        return True

    def _same_shape_batches(self, group) -> Iterable[list]:
        batches = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            batches[(tuple(p.shape), p.dtype, p.device)].append(p)
        return batches.values()

    def _momentum_update(self, group, params: list) -> Tensor:
        """Momentum buffers advanced in place; returns the (N, rows, cols) update to orthogonalise."""
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        stacked = torch.stack(bufs)
        if group["nesterov"]:
            stacked = torch.stack(grads).lerp_(stacked, mu)
        return stacked

    def _apply(self, group, params: list, ortho: Tensor) -> None:
        rows, cols = params[0].shape
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)),
                            alpha=-lr * math.sqrt(max(1.0, rows / cols)))


class MuonWithAdamW:
    """One optimizer over two: :class:`Muon` for the hidden matrices, ``torch.optim.AdamW`` for the
    rest. ``param_groups`` lists Muon's groups then AdamW's (the same dicts: setting ``lr`` works);
    ``state_dict`` numbers the parameters across both like a single torch optimizer does."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        self.defaults = {}

    @property
    def optimizers(self) -> tuple:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({pid + offset: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [pid + offset for pid in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        n_muon = len(self.muon.param_groups)
        if len(groups) != n_muon + len(self.adamw.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer "
                             f"{n_muon + len(self.adamw.param_groups)} (muon + adamw)")
        offset = 0
        for opt, own in ((self.muon, groups[:n_muon]), (self.adamw, groups[n_muon:])):
            count = sum(len(g["params"]) for g in own)
            ids = {pid for g in own for pid in g["params"]}
            part_state = {pid - offset: st for pid, st in state_dict["state"].items() if pid in ids}
            part_groups = [{**g, "params": [pid - offset for pid in g["params"]]} for g in own]
            opt.load_state_dict({"state": part_state, "param_groups": part_groups})
            offset += count


def muon_param_names(model) -> list[str]:
    """The parameters Muon trains: the 2-D weights inside the transformer blocks (attention and MLP
    matrices). Embeddings, the (tied) LM head, norms and biases stay with AdamW."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]


def adamw_kwargs(device_type: str) -> dict:
    """torch.optim.AdamW's implementation choice: ``fused`` on CUDA and on CPU (one kernel over every
    tensor; on CPU 3-4x faster than the default per-tensor loop at the default model's sizes,
    measured), torch's default elsewhere."""
    return {"fused": True} if device_type in ("cuda", "cpu") else {}


def _adamw_groups(params: list, weight_decay: float, lr_ratio: float = 1.0) -> list:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "lr_ratio": lr_ratio},
            {"params": no_decay, "weight_decay": 0.0, "lr_ratio": lr_ratio}]


def build_optimizer(model, *, optimizer: str = "adamw", lr: float, weight_decay: float, betas=(0.9, 0.95),
                    muon_lr: float = 0.02, muon_momentum: float = 0.95, ns_steps: int = 5,
                    ns_dtype: str = "auto", device_type: str = "cpu"):
    """The training optimizer for ``model`` (a GPT, possibly wrapped).

    ``adamw``: AdamW on everything, weight decay on the 2-D weights only (:func:`adamw_kwargs`).
    ``muon``: :class:`Muon` (``muon_lr``, ``muon_momentum``, Nesterov, ``weight_decay``) on
    :func:`muon_param_names`, AdamW (``lr``, ``betas``) on the rest. Each group's ``lr_ratio`` is
    its peak lr over ``lr``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    kwargs = adamw_kwargs(device_type)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied weight once
    if optimizer == "adamw":
        return torch.optim.AdamW(_adamw_groups([p for _, p in named], weight_decay), lr=lr, betas=betas, **kwargs)
    hidden = set(muon_param_names(model))
    muon = Muon([{"params": [p for n, p in named if n in hidden], "lr_ratio": muon_lr / lr}], lr=muon_lr,
                momentum=muon_momentum, weight_decay=weight_decay, ns_steps=ns_steps, ns_dtype=ns_dtype)
    rest = [p for n, p in named if n not in hidden]
    return MuonWithAdamW(muon, torch.optim.AdamW(_adamw_groups(rest, weight_decay), lr=lr, betas=betas, **kwargs))

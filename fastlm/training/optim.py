"""Optimizers for training: AdamW, or Muon for the hidden matrices with AdamW for the rest.

:class:`Muon` (Keller Jordan's "MomentUm Orthogonalized by Newton-Schulz") keeps a momentum buffer per
2-D weight and applies its orthogonalised direction, with the conventions of ``torch.optim.Muon``
(torch >= 2.13) so the two can be compared number for number. Its step is the op
:func:`fastlm.ops.muon_step` (the math: :mod:`fastlm.ops.reference_muon`): the batched PyTorch form
(the reference, what GPUs run) or, for CPU float32/float64 parameters whose Newton-Schulz dtype is
their own, the fused C++ op (``fused=None``, the default, picks it where it applies; 1.9-2.6x faster
at the default model's shapes).

:func:`build_optimizer` makes the parameter groups of a :class:`fastlm.model.GPT` and returns ONE
object with ``param_groups`` / ``state`` / ``step`` / ``zero_grad`` / ``state_dict`` /
``load_state_dict``, so ``GradScaler``, ``clip_grad_norm_`` and fastlm's checkpoints treat both
choices alike. Every group carries ``lr_ratio``: its peak learning rate over the AdamW one, so a
schedule sets ``group["lr"] = scheduled_lr * group["lr_ratio"]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastlm.errors import BackendUnavailableError
from fastlm.ops import muon_bf16_products, muon_step
from fastlm.ops.reference_muon import NS_COEFFICIENTS, resolve_ns_dtype

__all__ = [
    "Muon",
    "MuonWithAdamW",
    "OPTIMIZERS",
    "adamw_kwargs",
    "build_optimizer",
    "clip_grad_norm",
    "embedding_param_names",
    "optimizer_for",
    "run_ns_dtype",
    "muon_param_names",
    "load_checked_state",
]

OPTIMIZERS = ("adamw", "muon")
#: Muon's ``fused`` option -> the backend of :func:`fastlm.ops.muon_step`
_FUSED_BACKEND = {None: "auto", True: "cpp", False: "reference"}


def _closure_loss(closure):
    """What ``step(closure)`` returns: the closure's loss, computed with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, same-shape matrices orthogonalised as one batch (see the module doc).

    Group options: ``lr``, ``momentum`` (0.95), ``nesterov`` (True), ``weight_decay`` (0), ``ns_steps``
    (5), ``ns_coefficients``, ``ns_dtype`` ("auto" | "float32" | "bfloat16" | "float64"), ``eps``,
    ``fused`` (None: the C++ op where it applies, else the PyTorch form; True: the op or an error;
    False: the PyTorch form). State per parameter: ``momentum_buffer`` (the parameter's shape and dtype).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients=NS_COEFFICIENTS,
        ns_dtype: str = "auto",
        eps: float = 1e-7,
        fused: Optional[bool] = None,
    ):
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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            ns_dtype=ns_dtype,
            eps=eps,
            fused=fused,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes only 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Muon does not support sparse gradients")
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            try:
                muon_step(
                    params,
                    [p.grad for p in params],
                    bufs,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    weight_decay=group["weight_decay"],
                    ns_steps=group["ns_steps"],
                    ns_coefficients=group["ns_coefficients"],
                    ns_dtype=group["ns_dtype"],
                    eps=group["eps"],
                    backend=_FUSED_BACKEND[group.get("fused")],
                )
            except BackendUnavailableError as e:
                raise RuntimeError(f"Muon(fused=True) cannot run the fused step here: {e}") from None
        return loss


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
        loss = _closure_loss(closure)
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
            raise ValueError(
                f"optimizer state has {len(groups)} parameter groups, this optimizer "
                f"{n_muon + len(self.adamw.param_groups)} (muon + adamw)"
            )
        offset = 0
        for opt, own in ((self.muon, groups[:n_muon]), (self.adamw, groups[n_muon:])):
            count = sum(len(g["params"]) for g in own)
            ids = {pid for g in own for pid in g["params"]}
            part_state = {pid - offset: st for pid, st in state_dict["state"].items() if pid in ids}
            part_groups = [{**g, "params": [pid - offset for pid in g["params"]]} for g in own]
            opt.load_state_dict({"state": part_state, "param_groups": part_groups})
            offset += count


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` (the 2-norm), bit for bit, minus the
    multiply when every gradient is on the CPU and the clip coefficient clamps to 1: torch multiplies
    every gradient by the clamped coefficient whatever it is (on a GPU, looking at it would cost a
    device sync); by 1.0 that changes no bit, and on a CPU the look costs nothing. Past its first
    hundred steps the default run's gradient norm stays under its ``grad_clip`` of 1.0, so its steps
    skip the multiply over its 33 gradients. Returns the total norm. Other devices: torch's function."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.device.type != "cpu" for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm(grads, 2.0)  # torch's norm, on its own path
    # torch's coefficient, computed as torch computes it: max_norm / (total + 1e-6), clamped to 1
    coef = float(max_norm) / (total + 1e-6)
    if not bool(coef >= 1.0):  # below 1, or NaN: torch's multiply, as torch does it
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def muon_param_names(model) -> list[str]:
    """The parameters Muon trains: the 2-D weights inside the transformer blocks (attention and MLP
    matrices). Embeddings, the (tied) LM head, norms and biases stay with AdamW."""
    return [
        name for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")
    ]


def adamw_kwargs(device_type: str) -> dict:
    """torch.optim.AdamW's implementation choice: ``fused`` on CUDA and on CPU (one kernel over every
    tensor; on CPU 3-4x faster than the default per-tensor loop at the default model's sizes,
    measured), torch's default elsewhere."""
    return {"fused": True} if device_type in ("cuda", "cpu") else {}


#: the embedding side's own weights besides the tables: the smear's gains and the x0 mix's scalars
EMBEDDING_SIDE = ("smear_gain", "x0_keep", "x0_add")


def embedding_param_names(model) -> list[str]:
    """The parameters ``embed_lr_ratio`` speeds up: the embedding tables (the token embedding, learned
    positions, the value embeddings) and the weights that carry the embeddings on (the smear's gains, the
    x0 mix). A token embedding tied to the LM head is the head too, and keeps the AdamW rate."""
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and (
            name in ("wpe.weight",) + EMBEDDING_SIDE
            or name.startswith("value_embeds.")
            or (name == "wte.weight" and not tied)
        )
    ]


def _adamw_groups(params: list, weight_decay: float, embeddings=(), embed_lr_ratio: float = 1.0) -> list:
    """AdamW's groups: weight decay on the 2-D weights only; with an ``embed_lr_ratio`` other than 1, the
    ``embeddings`` among ``params`` in a third group at that multiple of the rate, every one of them decayed
    (the tables and the smear / x0-mix weights alike: how the default was measured). At 1 the two groups
    of the runs from before the setting, so their checkpoints resume."""
    special = {id(p) for p in embeddings} if embed_lr_ratio != 1.0 else set()
    decay = [p for p in params if p.dim() >= 2 and id(p) not in special]
    no_decay = [p for p in params if p.dim() < 2 and id(p) not in special]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_ratio": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_ratio": 1.0},
    ]
    if special:
        emb = [p for p in params if id(p) in special]
        groups.append({"params": emb, "weight_decay": weight_decay, "lr_ratio": float(embed_lr_ratio)})
    return groups


def build_optimizer(
    model,
    *,
    optimizer: str = "adamw",
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.95),
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    ns_steps: int = 5,
    ns_dtype: str = "auto",
    device_type: str = "cpu",
    embed_lr_ratio: float = 1.0,
):
    """The training optimizer for ``model`` (a GPT, possibly wrapped).

    ``adamw``: AdamW on everything, weight decay on the 2-D weights only (:func:`adamw_kwargs`).
    ``muon``: :class:`Muon` (``muon_lr``, ``muon_momentum``, Nesterov, ``weight_decay``) on
    :func:`muon_param_names`, AdamW (``lr``, ``betas``) on the rest. Each group's ``lr_ratio`` is
    its peak lr over ``lr``. ``embed_lr_ratio``: the AdamW rate of :func:`embedding_param_names` is
    ``lr`` times this (their own group; 1: no group of their own).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not (isinstance(embed_lr_ratio, (int, float)) and math.isfinite(embed_lr_ratio) and embed_lr_ratio > 0):
        raise ValueError(f"embed_lr_ratio must be a finite number > 0, got {embed_lr_ratio!r}")
    kwargs = adamw_kwargs(device_type)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied weight once
    emb_names = set(embedding_param_names(model))
    emb = [p for n, p in named if n in emb_names]
    if optimizer == "adamw":
        groups = _adamw_groups([p for _, p in named], weight_decay, emb, embed_lr_ratio)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)
    hidden = set(muon_param_names(model))
    muon = Muon(
        [{"params": [p for n, p in named if n in hidden], "lr_ratio": muon_lr / lr}],
        lr=muon_lr,
        momentum=muon_momentum,
        weight_decay=weight_decay,
        ns_steps=ns_steps,
        ns_dtype=ns_dtype,
    )
    rest = [p for n, p in named if n not in hidden]
    groups = _adamw_groups(rest, weight_decay, emb, embed_lr_ratio)
    return MuonWithAdamW(muon, torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs))


# ---- restoring a saved state (a checkpoint is untrusted input) ----------------------------------------

#: group fields that never come from a saved state: the schedule sets ``lr`` every step, and the
#: implementation flags follow the device the run resumes on
_LIVE_FIELDS = {"params", "lr", "fused", "foreach", "capturable", "differentiable"}


def run_ns_dtype(name: str, device_type: str, autocast_dtype: torch.dtype) -> str:
    """The Newton-Schulz dtype of a run's Muon (``--muon-ns-dtype``): a named one as given; ``auto`` is
    ``bfloat16`` in a CPU run under bfloat16 autocast where the fused step has bf16 products
    (:func:`fastlm.ops.muon_bf16_products`: float32 sums, the direct iteration; 2.1x faster than its
    float32 step), else Muon's own ``auto`` (float32 on a CPU, bfloat16 on CUDA)."""
    if name == "auto" and device_type == "cpu" and autocast_dtype == torch.bfloat16 and muon_bf16_products("cpu"):
        return "bfloat16"
    return name


def optimizer_for(model, cfg, device_type: str, autocast_dtype: torch.dtype = torch.float32):
    """:func:`build_optimizer` with a run's settings (a resolved TrainConfig) and its autocast dtype:
    what the Trainer trains with."""
    return build_optimizer(
        model,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2),
        muon_lr=cfg.muon_lr,
        muon_momentum=cfg.muon_momentum,
        ns_dtype=run_ns_dtype(cfg.muon_ns_dtype, device_type, autocast_dtype),
        device_type=device_type,
        embed_lr_ratio=cfg.embed_lr_ratio,
    )


def _adamw_state_keys(group: dict) -> frozenset:
    return frozenset({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set()))


_STATE_KEYS = {Muon: lambda group: frozenset({"momentum_buffer"}), torch.optim.AdamW: _adamw_state_keys}


def load_checked_state(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for a state saved by an optimizer that
    :func:`build_optimizer` made from the same settings, after checking it (``ValueError`` naming
    the entry, ``opt.<id>.<key>`` as fastlm stores it).

    torch's own ``load_state_dict`` compares neither state shapes with the parameters (a short AdamW
    moment made torch's fused CPU kernel write past its buffer) nor the restored group
    hyperparameters with the constructor's checks (``ns_steps=10**9`` hung the Muon step). Here the
    groups must list the same parameters and hold this optimizer's hyperparameters (so every value
    the optimizer runs with is the one built from the run's settings), and each parameter's state
    holds exactly its optimizer's keys: tensors of the parameter's shape and a floating dtype, step
    counters one-element tensors holding whole numbers >= 0."""
    live = optimizer.state_dict()
    _check_groups(state_dict.get("param_groups"), live["param_groups"])
    expected = [
        (p, _STATE_KEYS[type(opt)](group))
        for opt in getattr(optimizer, "optimizers", (optimizer,))
        for group in opt.param_groups
        for p in group["params"]
    ]
    state = state_dict.get("state")
    if not isinstance(state, dict):
        raise ValueError("the optimizer state is not a mapping of parameter ids")
    for pid, entry in state.items():
        _check_entry(pid, entry, expected)
    optimizer.load_state_dict({"state": state, "param_groups": live["param_groups"]})


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_groups(saved, live: list) -> None:
    if not isinstance(saved, list) or len(saved) != len(live):
        raise ValueError(
            f"the optimizer state has {len(saved) if isinstance(saved, list) else 'no'} parameter "
            f"groups, this run's optimizer {len(live)}"
        )
    for i, (group, own) in enumerate(zip(saved, live)):
        if not isinstance(group, dict) or group.get("params") != own["params"]:
            raise ValueError(f"optimizer parameter group {i} lists other parameters than this run's")
        for key in sorted(set(group) & set(own) - _LIVE_FIELDS):
            if _plain(group[key]) != _plain(own[key]):
                raise ValueError(
                    f"optimizer parameter group {i} has {key}={_short(group[key])}; this run's "
                    f"settings give {_short(own[key])}"
                )


def _check_entry(pid, entry, expected: list) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(expected):
        raise ValueError(f"the optimizer state names parameter {_short(pid)}; the optimizer has {len(expected)}")
    param, keys = expected[pid]
    if not isinstance(entry, dict) or (entry and set(entry) != keys):
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"the optimizer state of parameter {pid} holds {got}, expected {sorted(keys)}")
    for key, value in entry.items():
        name = f"opt.{pid}.{key}"
        if key == "step":
            _check_step(name, value)
        elif not (torch.is_tensor(value) and value.is_floating_point() and value.shape == param.shape):
            got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"optimizer state tensor {name} is {got}; its parameter needs a floating tensor of "
                f"shape {tuple(param.shape)}"
            )


def _check_step(name: str, value) -> None:
    """A step counter: a one-element real tensor (what torch's AdamW keeps) holding a whole number >= 0."""
    number = value.item() if torch.is_tensor(value) and value.numel() == 1 and not value.is_complex() else None
    if (
        isinstance(number, bool)
        or not isinstance(number, (int, float))
        or not (math.isfinite(number) and 0 <= number < 2**53 and number == int(number))
    ):
        raise ValueError(
            f"optimizer state {name} must be a tensor holding a whole number of steps >= 0, got {_short(value)}"
        )

"""Learning-rate schedules: linear warm-up, then cosine to the final LR, plateau, constant, or
warmup-stable-decay (``wsd``: the peak LR until the last ``decay_frac`` of the steps, then a linear
decay to the final LR; the "trapezoidal" schedule of the modded-nanogpt speedrun).

Extending (or shortening) a cosine run on ``--resume`` with another ``--max-iters``: the schedule is
re-anchored at the resume step. From there the LR decays from the value it had at that step to
the final LR at the new last step, along the same half-cosine shape, so there is no jump (a plain
recomputation of the cosine over the new span would move the LR back up). The anchor is saved
with the scheduler state, so a second resume continues the same curve. A ``wsd`` run resumed with
another ``--max-iters`` keeps the peak LR while both plans are in their stable phase (its decay then
starts where the new span puts it); once either plan has begun decaying, the LR decays linearly from
its value at the resume step to the final LR at the new last step.
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["LRSchedule"]


class LRSchedule:
    """Warm-up then cosine (to the final LR) / plateau (x factor after patience bad evals) / constant.

    ``cfg`` needs ``lr``, ``final_lr``, ``warmup_iters``, ``max_iters``, ``lr_schedule``,
    ``plateau_patience`` and ``plateau_factor`` (a :class:`~fastlm.training.settings.TrainConfig`).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.scale = 1.0  # plateau multiplier
        self.bad = 0
        self.best = math.inf
        self.anchor: Optional[tuple[int, float, int]] = None  # (step, lr there, max_iters planned then)

    def _cosine(self, step: int, start: int, lr_start: float, end: int) -> float:
        final = self.cfg.final_lr
        frac = min(1.0, (step - start) / max(1, end - start))
        return final + 0.5 * (1 + math.cos(math.pi * frac)) * (lr_start - final)

    def lr(self, step: int) -> float:
        c = self.cfg
        if c.warmup_iters and step < c.warmup_iters:
            return c.lr * (step + 1) / c.warmup_iters
        if c.lr_schedule == "cosine":
            if self.anchor is not None and step >= self.anchor[0]:
                return self._cosine(step, self.anchor[0], self.anchor[1], c.max_iters)
            return self._cosine(step, c.warmup_iters, c.lr, self._planned_end())
        if c.lr_schedule == "plateau":
            return max(c.final_lr, c.lr * self.scale)
        if c.lr_schedule == "wsd":
            return self._wsd(step, c.max_iters)
        return c.lr

    def _decay_start(self, max_iters: int) -> int:
        return max(self.cfg.warmup_iters, max_iters - round(self.cfg.decay_frac * max_iters))

    def _wsd(self, step: int, max_iters: int) -> float:
        """wsd after the warm-up: the peak LR, then linear to the final LR at ``max_iters`` (from the
        anchor's LR when a resume re-anchored the decay)."""
        if self.anchor is not None and step >= self.anchor[0]:
            start, lr_start = self.anchor[0], self.anchor[1]
        else:
            start, lr_start = self._decay_start(max_iters), self.cfg.lr
            if step < start:
                return lr_start
        frac = min(1.0, (step - start) / max(1, max_iters - start))
        return lr_start + (self.cfg.final_lr - lr_start) * frac

    def _planned_end(self) -> int:
        """The last step of the original cosine (before any re-anchoring)."""
        return self.anchor[2] if self.anchor is not None else self.cfg.max_iters

    def observe(self, val_loss: float) -> bool:
        """Plateau bookkeeping after an evaluation; True when the LR was just reduced."""
        if self.cfg.lr_schedule != "plateau":
            return False
        if val_loss < self.best:
            self.best, self.bad = val_loss, 0
            return False
        self.bad += 1
        if self.bad >= self.cfg.plateau_patience:
            self.scale *= self.cfg.plateau_factor
            self.bad = 0
            return True
        return False

    def state(self) -> dict:
        return {
            "scale": self.scale,
            "bad": self.bad,
            "best": self.best if math.isfinite(self.best) else None,
            "max_iters": self.cfg.max_iters,
            "anchor": list(self.anchor) if self.anchor else None,
        }

    def load(self, s: dict, step: int) -> None:
        """Restore a saved state at ``step``; re-anchor the cosine if max_iters changed since.
        ``ValueError`` for a value no schedule holds (a state file is untrusted input)."""
        self.scale, self.bad = _number(s["scale"], "scale", positive=True), _count(s["bad"], "bad")
        self.best = math.inf if s.get("best") is None else _number(s["best"], "best")
        anchor = s.get("anchor")
        if anchor and not (isinstance(anchor, list) and len(anchor) == 3):
            raise ValueError("scheduler state: anchor must be [step, lr, end]")
        self.anchor = (
            (_count(anchor[0], "anchor"), _number(anchor[1], "anchor"), _count(anchor[2], "anchor")) if anchor else None
        )
        saved_max = _count(s.get("max_iters", self.cfg.max_iters), "max_iters")
        if saved_max == self.cfg.max_iters or step < self.cfg.warmup_iters:
            return  # warm-up does not depend on max_iters; after it the new span applies from the start
        if self.cfg.lr_schedule == "cosine":
            current = self._lr_with_max(step, saved_max)
            self.anchor = (step, current, self.anchor[2] if self.anchor else saved_max)
        elif self.cfg.lr_schedule == "wsd" and (
            self.anchor is not None or step >= min(self._decay_start(saved_max), self._decay_start(self.cfg.max_iters))
        ):
            self.anchor = (step, self._wsd(step, saved_max), saved_max)

    def _lr_with_max(self, step: int, max_iters: int) -> float:
        """The LR the saved schedule (which ran to ``max_iters``) gives at ``step``."""
        if self.anchor is not None and step >= self.anchor[0]:
            return self._cosine(step, self.anchor[0], self.anchor[1], max_iters)
        return self._cosine(step, self.cfg.warmup_iters, self.cfg.lr, max_iters)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"scheduler state: {name} must be a whole number >= 0, got {str(value)[:40]}")
    return value


def _number(value, name: str, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (positive and value <= 0)
    ):
        raise ValueError(
            f"scheduler state: {name} must be a finite{' positive' if positive else ''} number, got {str(value)[:40]}"
        )
    return float(value)

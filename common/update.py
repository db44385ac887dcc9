"""One optimizer update: micro-batches, accumulation and the step, in one place for every loop.

The caller (the supervised loop, ReMax, GRPO, PPO's actor and critic) computes each
micro-batch's loss and hands it to `Accumulation.add`; the guard only says whether that
loss is finite on every rank (one all-reduce, so every rank decides the same). A finite
loss goes to backward, scaled by the number of micro-batches the update was planned
with; a non-finite one never reaches backward, so it leaves no trace in the engine.
`Accumulation.step` is the boundary: the optimizer steps when at least one micro-batch
was kept, and an update whose micro-batches were all skipped leaves weights, optimizer
state, schedule and counters exactly as they were.
"""
from __future__ import annotations

import torch


class Accumulation:
    """Accumulates up to `size` micro-batch gradients of `engine` between optimizer steps."""

    def __init__(self, strategy, engine, guard, size: int, what: str = "loss"):
        self.strategy, self.engine, self.guard = strategy, engine, guard
        self.size, self.what = size, what
        self.kept = 0       # micro-batches accumulated since the last step

    def add(self, loss: torch.Tensor) -> bool:
        """Backward of `loss` when it is finite on every rank (a collective); False when skipped."""
        if not self.guard.finite(self.what, loss.detach()):
            return False
        self.strategy.backward(self.engine, loss, self.size)
        self.kept += 1
        return True

    @property
    def full(self) -> bool:
        return self.kept >= self.size

    def step(self) -> bool:
        """The boundary: step when anything was accumulated (the same on every rank)."""
        if not self.kept:
            return False
        self.strategy.step(self.engine)
        self.kept = 0
        return True

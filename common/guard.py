"""Guarding the training loops against non-finite numbers, and the fault injection tests use.

A NaN that reaches `backward` poisons gradients, optimizer moments and, through ZeRO's
collectives, every rank; DeepSpeed only screens gradients for overflow under fp16. So
the loops ask `NonFiniteGuard.finite` *before* backward: every rank contributes one
flag to an all-reduce, so all ranks take the same decision and never diverge. What a
skip means for the engine (nothing: no backward, no step) is `common/update.py`'s.

Fault injection (read here and nowhere else), each a comma list of STEP or STEP@RANK;
STEP is the step being attempted, and a STEP listed k times fires on k attempts:
    DENSEHF_NAN_AT_STEPS   make that attempt's loss (stage 3: rewards) NaN
    DENSEHF_EXIT_AT_STEP   the rank dies abruptly (os._exit) after that step
    DENSEHF_HANG_AT_STEP   the rank hangs (sleeps forever) after that step; SIGTERM ends it
    DENSEHF_KILL_AT_STEP   SIGKILL the rank after that step (resume tests)
    DENSEHF_TERM_AT_STEP   SIGTERM after that step, to the deepspeed launcher when there is one (as a
                           scheduler does; it forwards the signal to the ranks), else to the rank
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from typing import Optional

import torch

from common.errors import DensehfError
from common.logger import log


class NonFiniteGuard:
    """Counts skipped updates; stops the run after `max_bad` in a row (--max_bad_steps)."""

    def __init__(self, strategy, max_bad: int, total: int = 0):
        self.strategy = strategy
        self.max_bad = max(1, max_bad)
        self.total = total      # all skipped updates of the run (kept in checkpoints)
        self.streak = 0         # consecutive ones
        self.step = 0           # the step being attempted, for messages

    def finite(self, what: str, *tensors: Optional[torch.Tensor]) -> bool:
        """True when every tensor is finite on every rank (a collective: call it on all ranks)."""
        bad = any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors)
        flags = self.strategy.all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))
        if flags.item() == 0:
            self.streak = 0
            return True
        self.total += 1
        self.streak += 1
        log.warning("step %d: non-finite %s on %d rank(s): update skipped (%d in a row, %d in this run)",
                    self.step, what, int(flags.item()), self.streak, self.total)
        if self.streak >= self.max_bad:
            raise DensehfError(f"step {self.step}: {self.streak} updates in a row with a non-finite {what}; "
                               f"stopping (--max_bad_steps {self.max_bad}). Lower the learning rate, use "
                               f"fp32 or check the data; --resume restarts from the last checkpoint")
        return False


def _plan(var: str) -> Counter:
    """{(step, rank or None): times} from 'STEP[@RANK],...'."""
    plan: Counter = Counter()
    for item in filter(None, (s.strip() for s in os.environ.get(var, "").split(","))):
        step, _, rank = item.partition("@")
        plan[int(step), int(rank) if rank else None] += 1
    return plan


_NAN_PLAN: Optional[Counter] = None


def inject_nan(step: int, rank: int) -> bool:
    """True (once per listing) when DENSEHF_NAN_AT_STEPS asks for a NaN on this attempt."""
    global _NAN_PLAN
    if _NAN_PLAN is None:
        _NAN_PLAN = _plan("DENSEHF_NAN_AT_STEPS")
    for key in ((step, rank), (step, None)):
        if _NAN_PLAN[key] > 0:
            _NAN_PLAN[key] -= 1
            return True
    return False


def poison(t: torch.Tensor) -> torch.Tensor:
    """`t` with a NaN in it (keeps the autograd graph, like a real overflow would)."""
    return t * float("nan")


def _launcher_pid() -> Optional[int]:
    """The deepspeed launcher's pid if it started this process."""
    import psutil
    parent = psutil.Process(os.getppid())
    return parent.pid if any("deepspeed.launcher.launch" in part for part in parent.cmdline()) else None


def fault_point(step: int, rank: int) -> None:
    """End of a step: die, hang or get SIGKILLed here if the environment asks for it."""
    def hit(var: str) -> bool:
        plan = _plan(var)
        return plan[step, rank] + plan[step, None] > 0
    if hit("DENSEHF_KILL_AT_STEP"):
        os.kill(os.getpid(), signal.SIGKILL)
    if hit("DENSEHF_TERM_AT_STEP"):
        os.kill(_launcher_pid() or os.getpid(), signal.SIGTERM)
    if hit("DENSEHF_EXIT_AT_STEP"):
        log.warning("step %d: DENSEHF_EXIT_AT_STEP: rank %d exits abruptly", step, rank)
        os._exit(13)
    if hit("DENSEHF_HANG_AT_STEP"):
        log.warning("step %d: DENSEHF_HANG_AT_STEP: rank %d hangs", step, rank)
        # The launcher reaps a failed job with SIGTERM, then SIGKILL after 30 s: a hang the
        # preemption handler would survive costs the fault tests those 30 s and shows nothing.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(3600)

"""Preemption: a scheduler's warning signal ends a stage at the next step boundary, with a checkpoint.

SLURM and Kubernetes send SIGTERM before they take a node (SLURM also SIGUSR1 with
`--signal=USR1@120`); the deepspeed launcher forwards SIGTERM to one rank at a time. A file
OUTPUT_DIR/STOP asks the same (what the SLURM scripts' USR1 trap writes: it reaches ranks on
every node through the shared output folder). Each rank only notes a signal; at every step
boundary the ranks agree in one collective (one rank's request is every rank's), all save and
the stage exits with PREEMPTED_EXIT_CODE (75). `--resume` then continues to the same weights as
an uninterrupted run.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Optional

import torch

from common.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE = "STOP"


class PreemptionWatch:
    """Notes SIGTERM/SIGUSR1 while active (a context manager: the previous handlers come back)."""

    def __init__(self, strategy, output_dir: str | Path):
        self.strategy = strategy
        self.stop_file = Path(output_dir) / STOP_FILE
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:  # a handler only sets a flag: the step finishes first
        self.received = signal.Signals(signum).name

    def requested(self) -> Optional[str]:
        """At a step boundary, on every rank: the signal if any rank got one (a collective)."""
        asked = self.received is not None or (self.strategy.is_main and self.stop_file.is_file())
        flag = self.strategy.all_reduce_sum(torch.tensor([float(asked)], dtype=torch.float64))
        if flag.item() == 0:
            return None
        return self.received or (str(self.stop_file) if self.strategy.is_main else "another rank's request")

    def done(self) -> None:
        """After the checkpoint: the stop file is used up (a requeued job must not stop at once)."""
        if self.strategy.is_main:
            self.stop_file.unlink(missing_ok=True)

    def stop_if_requested(self, step: int, save: Optional[Callable[[], object]], checkpoints: str) -> None:
        """At a step boundary, on every rank: when any rank was asked to stop, save (`save` None: this
        step is saved already), use up the request and raise Preempted."""
        if signal_name := self.requested():
            if save is not None:
                save()
            self.done()
            raise Preempted(signal_name, step, checkpoints)

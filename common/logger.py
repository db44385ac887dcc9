"""Run logging: TensorBoard scalars, a JSONL metrics file, log lines and a progress bar.

Only rank 0 writes; metrics are averaged over ranks by the caller before logging.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("densehf")


class PhaseTimes:
    """Seconds per phase of a step, for the logs ('time_generate', ...). `sync` waits for the
    device (queued GPU work would otherwise be charged to the next phase)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds so far as `time_<phase>` metrics, and start again."""
        out = {f"time_{k}": v for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def claim_output_dir(out: Path):
    """One output folder, one run: an exclusive lock on OUTPUT_DIR/.lock, held while the run lives
    (the kernel drops it when the process dies, so a killed run leaves nothing stuck)."""
    import fcntl
    import os
    import socket

    from common.errors import DensehfError
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DensehfError(f"{out}: in use by a live run ({holder}); wait for it to end or use another "
                           "--output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


class RunLogger:
    def __init__(self, cfg, strategy, stage: str):
        self.is_main = strategy.is_main
        self.out = Path(cfg.output_dir)
        self.every = max(1, cfg.log_steps)
        self.writer = None
        self.bar = None
        self.started = time.time()
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = claim_output_dir(self.out)
        self.metrics_file = open(self.out / "metrics.jsonl", "a")
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(cfg.tensorboard_path or str(self.out / "tensorboard"))
        log.info("%s: writing to %s", stage, self.out)

    def progress(self, total: int, initial: int, desc: str) -> None:
        if self.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            mininterval=2.0, file=sys.stderr)

    def step(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.is_main:
            return
        if self.bar is not None and prefix == "train":
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]})
        for key, value in metrics.items():
            if self.writer is not None:
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.metrics_file.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.metrics_file.flush()
        if prefix != "train" or step % self.every == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            (self.bar.write if self.bar is not None else log.info)(f"step {step} {prefix}: {shown}")

    def summary(self, data: dict) -> None:
        if not self.is_main:
            return
        data = {**data, "wall_seconds": round(time.time() - self.started, 1)}
        (self.out / "summary.json").write_text(json.dumps(data, indent=1))
        log.info("summary: %s", json.dumps(data))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.is_main:
            self.metrics_file.close()
            self.lock.close()  # releases the lock

"""The skeleton every training loop shares: the supervised `fit` and stage 3's RL loop.

`TrainingRun` holds what a checkpoint keeps (step, epoch, position in the epoch, skipped
updates, and whatever a loop adds), resumes it, walks the seeded data order across
epochs, and does what follows each optimizer step (log, evaluate and save on cadence,
fault points, preemption) and the end of the run (final evaluation, last checkpoint,
summary). A loop's body only says how one step is computed:

    run = TrainingRun(cfg, strategy, engines, "sft", total, len(rows), batch_size)
    run.start(evaluate, "sft")
    for idx in run.micro_batches():
        ...                          # one micro-batch; when an optimizer step is complete:
        run.end_step(metrics, evaluate)
    run.end(evaluate())              # then export, then
    summary = run.close({...})
"""
from __future__ import annotations

from typing import Callable, Optional

from common.checkpoint import CheckpointManager
from common.data.batches import ResumableBatches
from common.guard import fault_point
from common.logger import RunLogger, log
from common.preemption import PreemptionWatch


class TrainingRun:
    def __init__(self, cfg, strategy, engines: dict, stage: str, total_steps: int, n_rows: int, batch_size: int,
                 **extra_state):
        self.cfg, self.strategy, self.engines, self.stage, self.total = cfg, strategy, engines, stage, total_steps
        self.ckpt = CheckpointManager(strategy, cfg.output_dir, cfg.save_total_limit, stage=stage)
        self.logger = RunLogger(cfg, strategy, stage)
        self.batches = ResumableBatches(n_rows, batch_size, strategy.rank, strategy.world_size, cfg.seed)
        self.state = {"step": 0, "epoch": 0, "micro": 0, "bad_steps": 0, **extra_state}
        self.last_saved = 0
        self.preemption: Optional[PreemptionWatch] = None

    @property
    def step(self) -> int:
        return self.state["step"]

    def start(self, evaluate: Callable[[], dict], label: str) -> Optional[dict]:
        """Resume if asked; at step 0 evaluate the starting model (returned, and logged as step 0)."""
        if self.cfg.resume:
            loaded = self.ckpt.load(self.engines)
            if loaded:
                self.state.update({k: loaded.get(k, v) for k, v in self.state.items()})
                self.last_saved = self.step
                log.info("resumed from step %d (epoch %d, micro-batch %d)", self.step, self.state["epoch"],
                         self.state["micro"])
            else:
                log.info("--resume: no complete checkpoint in %s, starting fresh", self.ckpt.root)
        initial = None
        if self.step == 0:
            initial = evaluate()
            self.logger.step(0, initial, prefix="eval")
        self.logger.progress(self.total, self.step, label)
        return initial

    def micro_batches(self):
        """This rank's row indices, micro-batch by micro-batch, in the seeded order from where the run
        stands, until the last step is done; SIGTERM/SIGUSR1/STOP are watched meanwhile."""
        with PreemptionWatch(self.strategy, self.cfg.output_dir) as self.preemption:
            while self.step < self.total:
                for idx in self.batches.epoch(self.state["epoch"], start=self.state["micro"]):
                    self.state["micro"] += 1
                    yield idx
                    if self.step >= self.total:
                        return
                self.state["epoch"], self.state["micro"] = self.state["epoch"] + 1, 0

    def end_step(self, metrics: dict, evaluate: Callable[[], dict]) -> None:
        """An optimizer step is done: count and log it, evaluate and save on cadence, then the fault
        point and the preemption check (a stop saves first unless this step was just saved)."""
        self.state["step"] += 1
        step, cfg = self.step, self.cfg
        self.logger.step(step, metrics)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total:
            self.logger.step(step, evaluate(), prefix="eval")
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total:
            self.save()
        fault_point(step, self.strategy.rank)
        if step < self.total:
            self.preemption.stop_if_requested(step, None if self.last_saved == step else self.save,
                                              str(self.ckpt.root))

    def save(self) -> None:
        self.ckpt.save(self.engines, self.step, self.state)
        self.last_saved = self.step

    def end(self, final_eval: dict) -> None:
        """Log the final evaluation and keep a checkpoint of the last step."""
        self.logger.step(self.step, final_eval, prefix="eval")
        if self.last_saved != self.step:
            self.save()

    def close(self, summary: dict) -> dict:
        """Write summary.json: the stage's own fields after the ones every stage reports."""
        summary = {"stage": self.stage, "steps": self.step, "processes": self.strategy.world_size,
                   "bad_steps": self.state["bad_steps"], "damaged_checkpoints": self.ckpt.damaged, **summary}
        self.logger.summary(summary)
        self.logger.close()
        return summary

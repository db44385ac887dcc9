"""Atomic, rotating checkpoints of one or more DeepSpeed engines plus resume state.

Layout under OUTPUT_DIR/checkpoints:
    step00000040/<engine name>/...   DeepSpeed shards (weights, optimizer, scheduler)
    step00000040/rng_rank{r}.json    each rank's RNG streams
    step00000040/state.json          client state (step, epoch, data position, ...)
    latest                           name of the newest complete checkpoint
A checkpoint is written into `.tmp-stepN`, renamed into place, and only then does
`latest` move (itself via a rename), so a kill at any moment leaves the previous
checkpoint intact and pointed to.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.errors import DensehfError


class CheckpointManager:
    def __init__(self, strategy, output_dir: str | Path, keep_last: int = 2, stage: str = ""):
        self.strategy = strategy
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.stage = stage

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = safe_join(self.root, pointer.read_text().strip(), pointer)
        return path if (path / "state.json").is_file() else None

    def save(self, engines: dict, step: int, state: dict) -> Path:
        s = self.strategy
        name = f"step{step:08d}"
        staging, final = self.root / f".tmp-{name}", self.root / name
        if s.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # a save that was killed half-way
            staging.mkdir(parents=True)
        s.barrier()
        for key, engine in engines.items():
            if _trainable(engine):
                engine.save_checkpoint(str(staging / key), tag="state", save_latest=False)
            else:
                s.save_weights(engine, staging / f"{key}.safetensors")
        (staging / f"rng_rank{s.rank}.json").write_text(json.dumps(_rng_state()))
        s.barrier()
        if s.is_main:
            _write_json(staging / "state.json", {**state, "stage": self.stage, "step": step,
                                                 "world_size": s.world_size})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            tmp = self.root / ".latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, self.root / "latest")
            self._rotate()
        s.barrier()
        return final

    def load(self, engines: dict) -> Optional[dict]:
        """Restore every engine and this rank's RNG from the latest checkpoint; its state."""
        path = self.latest()
        if path is None:
            return None
        state = json.loads((path / "state.json").read_text())
        if self.stage and state.get("stage") not in (None, self.stage):
            raise DensehfError(f"{path}: checkpoint of stage '{state['stage']}', "
                               f"this is stage '{self.stage}': wrong --output_dir?")
        if state.get("world_size") != self.strategy.world_size:
            raise DensehfError(f"{path}: saved with {state.get('world_size')} processes, "
                               f"resumed with {self.strategy.world_size}; use the same number")
        for key, engine in engines.items():
            if not _trainable(engine):
                self.strategy.load_weights(engine, path / f"{key}.safetensors")
                continue
            loaded, _ = engine.load_checkpoint(str(path / key), tag="state")
            if loaded is None:
                raise DensehfError(f"{path / key}: could not load the '{key}' checkpoint")
        _set_rng_state(json.loads((path / f"rng_rank{self.strategy.rank}.json").read_text()))
        return state

    def _rotate(self) -> None:
        done = sorted(p for p in self.root.glob("step*") if (p / "state.json").is_file())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def safe_join(root: Path, name: str, source) -> Path:
    """`root / name` for a name read from a file or config, refusing one that leaves `root`.

    A tampered `latest` ('../../x', an absolute path, a symlink out) must not make a run
    load, rotate or overwrite files elsewhere.
    """
    path = Path(root) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(root).resolve()):
        raise DensehfError(f"{source}: '{name}' points outside {root}; refusing it (edited or copied from "
                           "another machine?). Fix or delete the file")
    return path


def _trainable(engine) -> bool:
    return not getattr(engine, "densehf_frozen", False)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _rng_state() -> dict:
    """All RNG streams as JSON (no pickle, so loading a checkpoint runs no code)."""
    np_state = np.random.get_state()
    state = {"python": _jsonable(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj

"""Atomic, rotating checkpoints of one or more DeepSpeed engines plus resume state.

Layout under OUTPUT_DIR/checkpoints:
    step00000040/<engine name>/...   DeepSpeed shards (weights, optimizer, scheduler)
    step00000040/rng_rank{r}.json    each rank's RNG streams
    step00000040/state.json          client state (step, epoch, data position, ...)
    step00000040/manifest.json       every file's size and CRC-32: written last
    latest                           name of the newest complete checkpoint
A checkpoint is written into `.tmp-stepN`, renamed into place, and only then does
`latest` move (itself via a rename), so a kill at any moment leaves the previous
checkpoint intact and pointed to. `load` verifies the manifest and falls back to the newest
intact checkpoint when a file is damaged (truncated by a crash or a full quota); a save that
cannot be written (no space, quota, permissions) is a clear error that leaves `latest` on the
previous checkpoint. Both assume the shared filesystem multi-node DeepSpeed saves need anyway.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.errors import DensehfError
from common.logger import log

MANIFEST = "manifest.json"


class CheckpointManager:
    def __init__(self, strategy, output_dir: str | Path, keep_last: int = 2, stage: str = ""):
        self.strategy = strategy
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.stage = stage
        self.damaged: list[str] = []   # checkpoints skipped at resume (rank 0), for the summary

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
        self._check_space()
        if s.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # a save that was killed half-way
            staging.mkdir(parents=True)
        s.barrier()
        try:
            for key, engine in engines.items():
                if s.is_trainable(engine):
                    s.save_state(engine, staging / key)
                else:
                    s.save_weights(engine, staging / f"{key}.safetensors")
            (staging / f"rng_rank{s.rank}.json").write_text(json.dumps(_rng_state()))
            s.barrier()
            if s.is_main:
                _write_json(staging / "state.json", {**state, "stage": self.stage, "step": step,
                                                     "world_size": s.world_size})
                _write_json(staging / MANIFEST, _manifest(staging))  # last: what the checkpoint holds
        except (OSError, RuntimeError) as e:  # ENOSPC, quota, permissions; torch reports some as RuntimeError
            shutil.rmtree(staging, ignore_errors=True)
            raise DensehfError(f"{staging}: writing the step-{step} checkpoint failed: {e}. {self._space_note()}; "
                               f"'latest' still points to {self._latest_name()}") from None
        if s.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            tmp = self.root / ".latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, self.root / "latest")
            self._rotate()
        s.barrier()
        return final

    def _latest_name(self) -> str:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else "no checkpoint"

    def _previous_bytes(self) -> Optional[int]:
        path = self.latest()
        if path is None or not (path / MANIFEST).is_file():
            return None
        return sum(f["bytes"] for f in json.loads((path / MANIFEST).read_text()).values())

    def _space_note(self) -> str:
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        need = self._previous_bytes()
        return (f"{free / 2**30:.2f} GiB free there" +
                (f", the previous checkpoint took {need / 2**30:.2f} GiB" if need else ""))

    def _check_space(self) -> None:
        """Say so before writing when the filesystem cannot hold another checkpoint the size of the last
        (rank 0 looks, every rank stops)."""
        need = self._previous_bytes() if self.strategy.is_main else None
        short = need is not None and shutil.disk_usage(self.root).free < need
        if self.strategy.all_reduce_sum(torch.tensor([float(short)], dtype=torch.float64)).item():
            raise DensehfError(f"{self.root}: no room for the next checkpoint: "
                               f"{self._space_note() if self.strategy.is_main else 'see rank 0'} "
                               "(free some space or lower --save_total_limit)")

    def load(self, engines: dict) -> Optional[dict]:
        """Restore every engine and this rank's RNG from the newest intact checkpoint; its state.

        Rank 0 verifies the manifests (newest first) and every rank loads the one it picked."""
        path = self._pick()
        if path is None:
            return None
        state = json.loads((path / "state.json").read_text())
        if self.stage and state.get("stage") not in (None, self.stage):
            raise DensehfError(f"{path}: checkpoint of stage '{state['stage']}', "
                               f"this is stage '{self.stage}': wrong --output_dir?")
        if state.get("world_size") != self.strategy.world_size:
            raise DensehfError(f"{path}: saved with {state.get('world_size')} processes, "
                               f"resumed with {self.strategy.world_size}; use the same number")
        try:
            for key, engine in engines.items():
                if not self.strategy.is_trainable(engine):
                    self.strategy.load_weights(engine, path / f"{key}.safetensors")
                    continue
                if not self.strategy.load_state(engine, path / key):
                    raise DensehfError(f"{path / key}: could not load the '{key}' checkpoint")
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
            # a file the manifest could not vouch for, or one holding more than tensors and DeepSpeed's
            # few classes (refused by the weights-only loader)
            raise DensehfError(f"{path}: cannot load this checkpoint ({_why(e)}); move it aside "
                               "to resume from an older one") from None
        _set_rng_state(json.loads((path / f"rng_rank{self.strategy.rank}.json").read_text()))
        return state

    def _pick(self) -> Optional[Path]:
        """The newest checkpoint whose files match its manifest, agreed by every rank (rank 0 reads)."""
        candidates = self._candidates()
        index, problems = 0, []
        if self.strategy.is_main:
            for i, path in enumerate(candidates, 1):
                problem = verify(path)
                if problem is None:
                    index = i
                    break
                log.warning("checkpoint %s is damaged (%s): trying an older one", path, problem)
                problems.append(f"{path.name}: {problem}")
            else:
                index = len(candidates) + 1 if candidates else 0  # none intact: every rank stops
        self.damaged = problems
        index = int(self.strategy.all_reduce_sum(torch.tensor([float(index)], dtype=torch.float64)).item())
        if index > len(candidates):
            raise DensehfError(f"{self.root}: no intact checkpoint to resume from ("
                               f"{', '.join(problems) if problems else 'see rank 0'})")
        if index > 1:
            log.warning("resuming from %s, not the damaged newer checkpoint(s)", candidates[index - 1].name)
        return candidates[index - 1] if index else None

    def _candidates(self) -> list[Path]:
        """'latest' first, then the older complete checkpoints, newest first."""
        latest = self.latest()
        older = sorted((p for p in self.root.glob("step*") if (p / "state.json").is_file() and p != latest),
                       reverse=True)
        return ([latest] if latest else []) + [p for p in older if latest is None or p.name < latest.name]

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


def _why(e: Exception) -> str:
    if isinstance(e, pickle.UnpicklingError):  # torch's own advice (load with weights_only=False) is left out
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        return (f"a file holds a pickled object ({found.group(1) if found else 'unknown'}) that is neither a "
                "tensor nor one of DeepSpeed's checkpoint classes: refused, nothing was run")
    return f"{type(e).__name__}: {e}"


def _manifest(folder: Path) -> dict:
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "crc32": _crc32(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}


def verify(folder: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files, or None when they match its manifest.

    A checkpoint from before manifests existed is taken as it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest}: unreadable"
    for name, want in expected.items():
        f = folder / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f}: {size} bytes, {want['bytes']} written"
        if _crc32(f) != want["crc32"]:
            return f"{f}: content changed since it was written (CRC-32)"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


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

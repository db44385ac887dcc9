"""Shared test setup: offline hub, one thread per rank, and a real deepspeed launcher."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"          # a hidden download fails instead of passing
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nproc: int = 2, env: dict | None = None,
           expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage entry point through the `deepspeed` launcher with `nproc` CPU ranks."""
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def imdb_task() -> Path:
    """The embedded task, built once (idempotent; shared with the demo's cache)."""
    from common.tasks.imdb import build_imdb_task
    return build_imdb_task()


@pytest.fixture(scope="session")
def tiny_model(imdb_task) -> str:
    from common.presets import resolve_model
    return resolve_model("tiny")

"""Shared test setup: offline hub, one thread per rank, and a real deepspeed launcher."""
from __future__ import annotations

import json
import os
import shutil
import signal
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


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# `make test` runs two pytest-xdist workers, a test file to a worker (--dist loadfile, so a
# module's fixtures are built once): two launcher runs side by side fill the cores that one leaves
# idle while its processes start. The stage-1/2 runs that every stage's tests start from are built
# once for both workers (`built_once`). (xdist's loadgroup cannot group on pytest 9: it writes its
# group into a test id that pytest no longer reads.)
NEEDS_SHARED_RUNS = {"sft_runs", "reward_runs"}


def file_order(item) -> int:
    """0: stage 3's launcher runs; 1: other slow tests that need no shared stage-1/2 run; 2: slow
    tests that need one; 3: the in-process tests."""
    needs = set(getattr(item, "fixturenames", ()))
    if "rl_runs" in needs:
        return 0
    if item.get_closest_marker("slow") is None:
        return 3
    return 2 if needs & NEEDS_SHARED_RUNS else 1


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """The order the workers take the files in (--no-loadscope-reorder), a file at the place of its
    earliest test by `file_order`: stage 3's first, which builds the shared stage-1/2 runs on its
    way (the longest chain of the suite); then the slow files that need none of them; then those
    that do, by when they are built, so no worker waits on the other's build; last the in-process
    files, small, which fill the cores while the other worker ends its last long file. A stable
    sort: each file's tests stay together and in order."""
    rank: dict = {}
    for item in items:
        rank[item.path] = min(rank.get(item.path, 3), file_order(item))
    items.sort(key=lambda item: rank[item.path])


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, built by `build(folder)` once for the whole run: under xdist the first
    worker to ask builds it (a file lock), the other waits for it and reuses it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's temp folder lies in the run's
    folder = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed on the other worker
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(autouse=True)
def no_leaked_process_group_env():
    """A stage's main run in-process sets RANK/MASTER_PORT... for its 1-process group (whose
    store keeps the port); a subprocess started by a later test must not inherit them."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nproc: int = 2, env: dict | None = None,
           expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage entry point through the `deepspeed` launcher with `nproc` CPU ranks."""
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / script), *map(str, args)]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the ranks too: a hung rank must not outlive the test
            raise
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def launch_two_nodes(script: str, args: list, tmp: Path, timeout: int = 600) -> None:
    """Two `deepspeed` launchers on this machine as node 0 and node 1 of a hostfile (--no_ssh
    --node_rank, master on 127.0.0.1, one process each): the multi-node path, for real."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [subprocess.Popen([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / script),
                               *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for node in (0, 1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{out[-6000:]}"


def read_metrics(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def assert_same_export(a: Path, b: Path) -> None:
    """Two runs' `hf_export` weights are bit-identical."""
    import torch
    from safetensors.torch import load_file
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for key in right:
        assert torch.equal(left[key], right[key]), key


def copy_checkpoints(reference: Path, run: Path, *steps: int) -> None:
    """Seed `run` with the reference run's checkpoints of `steps` (the last is `latest`)."""
    (run / "checkpoints").mkdir(parents=True)
    for step in steps:
        shutil.copytree(reference / "checkpoints" / f"step{step:08d}", run / "checkpoints" / f"step{step:08d}")
    (run / "checkpoints" / "latest").write_text(f"step{steps[-1]:08d}")


def kill_and_resume(script: str, args: list, kill_at: int, start_from: tuple[Path, int] | None = None) -> None:
    """SIGKILL every rank after step `kill_at`, then run again with --resume.

    With `start_from=(reference, step)` the killed run is itself a resume, from a copy of the
    uninterrupted reference run's checkpoint of that step: the test then redoes the steps around the
    kill, not the whole run, and also covers a resumed run killed again and a moved checkpoint."""
    first = args
    if start_from is not None:
        reference, step = start_from
        assert step < kill_at, "the kill must come after the copied checkpoint"
        copy_checkpoints(reference, Path(args[args.index("--output_dir") + 1]), step)
        first = [*args, "--resume"]
    killed = launch(script, first, env={"DENSEHF_KILL_AT_STEP": str(kill_at)}, expect_ok=False)
    assert killed.returncode != 0, "the kill did not happen"
    launch(script, [*args, "--resume"])


@pytest.fixture(scope="session")
def imdb_task() -> Path:
    """The embedded task, built once (idempotent; shared with the demo's cache)."""
    from common.tasks.imdb import build_imdb_task
    return build_imdb_task()


@pytest.fixture(scope="session")
def tiny_model(imdb_task) -> str:
    from common.presets import resolve_model
    return resolve_model("tiny")


SFT_STEPS = 24


def sft_args(model: str, out: Path, zero: int, cache: Path, *extra) -> list:
    return ["--model_name_or_path", model, "--data_path", "imdb", "--output_dir", out,
            "--data_output_path", cache, "--zero_stage", zero, "--max_steps", SFT_STEPS,
            "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16,
            "--max_seq_len", 64, "--max_eval_samples", 64, "--learning_rate", 3e-3,
            "--num_warmup_steps", 2, "--save_steps", 5, "--log_steps", 4, *extra]


@pytest.fixture(scope="session")
def sft_runs(tiny_model, tmp_path_factory):
    """Stage 1 through the launcher, once per ZeRO stage; later stages start from ZeRO-2's."""
    def build(root: Path) -> None:
        for zero in (2, 3):
            # three checkpoints kept (15, 20, 24): the resume tests restart from them
            launch("step1_sft/main.py", sft_args(tiny_model, root / f"zero{zero}", zero, root / "cache",
                                                 "--save_total_limit", 3))
    root = built_once(tmp_path_factory, "sft", build)
    return root, {zero: root / f"zero{zero}" for zero in (2, 3)}


REWARD_EVAL_ROWS, REWARD_MAX_LEN = 96, 64
# measured: the reward model diverges at lr 1e-3 on this backbone; at 5e-4, 80 steps reach
# ~0.73 and 160 steps ~0.78, which stage 3's tests need (a weaker one gives RL no signal)
# (the two that the resume tests restart from also keep a checkpoint 10 steps before their end)
REWARD_SCHEDULE = {("sequence", 2): ["--max_steps", 160, "--learning_rate", 5e-4, "--save_steps", 50],
                   ("sequence", 3): ["--max_steps", 80, "--learning_rate", 5e-4],
                   ("token", 2): ["--max_steps", 40, "--learning_rate", 2e-3],
                   ("token", 3): ["--max_steps", 40, "--learning_rate", 2e-3, "--save_steps", 10]}


@pytest.fixture(scope="session")
def reward_runs(sft_runs, tmp_path_factory) -> dict:
    """Stage 2 from the stage-1 output, both model types x ZeRO-2/3 (stage-3 tests reuse them)."""
    sft = sft_runs[1][2]

    def build(root: Path) -> None:
        for kind, zero in REWARD_SCHEDULE:
            launch("step2_reward/main.py", reward_args(kind, zero, sft, root / f"{kind}{zero}", root / "cache"))
    root = built_once(tmp_path_factory, "reward", build)
    return {(kind, zero): root / f"{kind}{zero}" for kind, zero in REWARD_SCHEDULE}


def reward_args(kind: str, zero: int, sft: Path, out: Path, cache: Path) -> list:
    return ["--model_type", kind, "--model_name_or_path", sft, "--data_path", "imdb", "--output_dir", out,
            "--data_output_path", cache, "--zero_stage", zero, *REWARD_SCHEDULE[kind, zero],
            "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16, "--max_seq_len", REWARD_MAX_LEN,
            "--max_eval_samples", REWARD_EVAL_ROWS, "--num_warmup_steps", 4, "--log_steps", 10,
            "--no-enable_tensorboard"]

"""Faults: non-finite losses and rewards are skipped on every rank, counted and bounded; a
dead or hung rank ends the job; a tampered checkpoint pointer is refused."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import guard as guard_module
from common.checkpoint import CheckpointManager
from common.errors import DensehfError
from common.guard import NonFiniteGuard, inject_nan
from common.strategy import DeepSpeedStrategy
from tests.conftest import launch, read_metrics, sft_args

NAN = float("nan")


def test_guard_skips_counts_and_stops_after_max_bad_steps():
    guard = NonFiniteGuard(DeepSpeedStrategy(SimpleNamespace()), max_bad=2)  # one process: no collective
    guard.step = 7
    assert guard.finite("loss", torch.tensor(1.0), None)
    assert not guard.finite("loss", torch.tensor([1.0, float("inf")]))
    assert guard.finite("loss", torch.tensor(0.5))  # a good update ends the streak
    assert not guard.finite("loss", torch.tensor(NAN))
    with pytest.raises(DensehfError, match=r"step 7: 2 updates in a row with a non-finite reward.*--max_bad_steps 2"):
        guard.finite("reward", torch.tensor([0.0, NAN]))
    assert guard.total == 3


@pytest.mark.parametrize("rank,expected", [(0, [3, 3]), (1, [3, 3, 5])])
def test_nan_injection_fires_once_per_listing_and_rank(monkeypatch, rank, expected):
    monkeypatch.setenv("DENSEHF_NAN_AT_STEPS", "3,3,5@1")
    monkeypatch.setattr(guard_module, "_NAN_PLAN", None)
    attempts = [1, 2, 3, 3, 3, 4, 5, 5]
    assert [s for s in attempts if inject_nan(s, rank)] == expected


def test_tampered_latest_pointer_is_refused(tmp_path):
    ckpt = CheckpointManager(None, tmp_path / "run")
    good, outside = ckpt.root / "step00000004", tmp_path / "x"
    for folder in (good, outside):
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    (ckpt.root / "link").symlink_to(outside)
    pointer = ckpt.root / "latest"
    pointer.write_text("step00000004")
    assert ckpt.latest() == good
    for name in ("../../x", str(outside), "link"):
        pointer.write_text(name)
        with pytest.raises(DensehfError, match="points outside"):
            ckpt.latest()


@pytest.mark.slow
def test_skipped_update_leaves_the_engine_untouched(tiny_model):
    """ZeRO-0/2/3, with and without accumulation: a NaN on one rank is skipped by both, and the
    engine ends bit-identical to one that never saw that micro-batch."""
    proc = launch("tests/fault_probe.py", [tiny_model])
    line = next(x for x in proc.stdout.splitlines() if "PROBE " in x)
    per_rank = json.loads(line.split("PROBE ", 1)[1])
    for rank, cases in enumerate(per_rank):
        for case, r in cases.items():
            assert r["skipped"] == [1] and r["clean_skipped"] == [], (rank, case)
            assert r["weights_equal"] and r["optimizer_equal"], (rank, case)
            assert r["counters"][0] == r["counters"][1], (rank, case)
            assert r["trained"] or rank == 1, case  # the comparison is not between untrained weights


FAULT_STEPS = 6


@pytest.fixture(scope="module")
def nan_sft(tiny_model, tmp_path_factory) -> Path:
    """SFT (ZeRO-3, 2 ranks) with a NaN loss on rank 1 at step 2 and on both ranks twice at step 4."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "nan"
    proc = launch("step1_sft/main.py", sft_args(tiny_model, out, 3, root / "cache", "--max_steps", FAULT_STEPS,
                                                "--log_steps", 1, "--no-enable_tensorboard"),
                  env={"DENSEHF_NAN_AT_STEPS": "2@1,4,4"})
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
@pytest.mark.alone
def test_sft_skips_non_finite_steps_and_counts_them(nan_sft):
    summary = json.loads((nan_sft / "summary.json").read_text())
    assert summary["steps"] == FAULT_STEPS and summary["bad_steps"] == 3
    train = read_metrics(nan_sft, "train")
    assert [r["step"] for r in train] == list(range(1, FAULT_STEPS + 1))
    assert [r["bad_steps"] for r in train] == [0, 1, 1, 3, 3, 3]
    assert all(r["loss"] == r["loss"] for r in train), "a NaN reached the logged losses"
    stdout = (nan_sft / "stdout.txt").read_text()
    assert "step 2: non-finite loss on 1 rank(s): update skipped" in stdout
    assert "step 4: non-finite loss on 2 rank(s): update skipped (2 in a row" in stdout


def untrained_reward_model(base: str, out: Path) -> Path:
    """A scalar-head model over the tiny backbone: enough for stage 3 to run (its scores are noise)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_remax_skips_bad_rollouts_then_stops_after_max_bad_steps(tiny_model, tmp_path):
    out = tmp_path / "remax"
    reward = untrained_reward_model(tiny_model, tmp_path / "rm")
    proc = launch("step3_rlhf/main.py", [
        "--algo", "remax", "--reward_calculator", "uniform", "--actor_model_name_or_path", tiny_model,
        "--reward_model_name_or_path", reward, "--data_path", "imdb", "--data_output_path", tmp_path / "cache",
        "--output_dir", out, "--actor_zero_stage", 2, "--per_device_generation_batch_size", 4,
        "--per_device_training_batch_size", 4, "--max_prompt_seq_len", 12, "--max_answer_seq_len", 6,
        "--max_steps", 5, "--max_eval_samples", 8, "--log_steps", 1, "--no-enable_tensorboard",
        "--max_bad_steps", 3], env={"DENSEHF_NAN_AT_STEPS": "2@1,3,3,3"}, expect_ok=False)
    assert proc.returncode != 0
    assert ("error: step 3: 3 updates in a row with a non-finite reward, score or log-prob; "
            "stopping (--max_bad_steps 3)") in proc.stderr
    assert [(r["step"], r["bad_steps"]) for r in read_metrics(out, "train")] == [(1, 0), (2, 1)]


def timed_launch(args: list, env: dict) -> tuple[object, float]:
    start = time.monotonic()
    proc = launch("step1_sft/main.py", args, env=env, expect_ok=False, timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.alone
def test_a_dead_rank_ends_the_job(nan_sft, tiny_model, tmp_path):
    args = sft_args(tiny_model, tmp_path / "run", 2, nan_sft.parent / "cache", "--max_steps", FAULT_STEPS)
    proc, seconds = timed_launch(args, {"DENSEHF_EXIT_AT_STEP": "2@1"})
    assert proc.returncode != 0 and "rank 1 exits abruptly" in proc.stdout
    assert not (tmp_path / "run" / "summary.json").exists()
    assert seconds < 120, seconds


@pytest.mark.slow
@pytest.mark.alone
def test_a_hung_rank_times_out_the_job(nan_sft, tiny_model, tmp_path):
    """Rank 1 sleeps forever after step 2: rank 0's next collective times out (6 s) and the job ends.
    The data cache is already built: rank 0 tokenising alone would outlast a 6 s barrier too."""
    args = sft_args(tiny_model, tmp_path / "run", 3, nan_sft.parent / "cache", "--max_steps", FAULT_STEPS,
                    "--dist_timeout_minutes", 0.1)
    proc, seconds = timed_launch(args, {"DENSEHF_HANG_AT_STEP": "2@1"})
    assert proc.returncode != 0 and "rank 1 hangs" in proc.stdout
    assert "Timed out waiting 6000ms" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    assert seconds < 120, seconds


@pytest.mark.slow
@pytest.mark.alone
def test_rank_0_tokenising_may_outlast_the_collective_timeout(tiny_model, tmp_path):
    """Tokenising the embedded SFT set takes ~10 s on rank 0 alone (with a plain barrier this run
    dies there, checked); the other rank waits on a
    long-timeout group, so a 1.2 s --dist_timeout_minutes (meant for dead ranks) does not end it."""
    proc = launch("step1_sft/main.py", ["--model_name_or_path", tiny_model, "--data_path", "imdb",
                                        "--output_dir", tmp_path / "run", "--data_output_path", tmp_path / "cache",
                                        "--dist_timeout_minutes", 0.02, "--validate_only"])
    assert "data OK" in proc.stdout and "19882 rows" in proc.stdout


def test_preemption_watch_notes_signals_and_the_stop_file(tmp_path):
    import os
    import signal

    from common.preemption import PreemptionWatch
    strategy = DeepSpeedStrategy(SimpleNamespace())  # one process: the collective is the flag itself
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch(strategy, tmp_path) as watch:
        assert watch.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)   # SLURM's --signal=USR1@120
        assert watch.requested() == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before   # handlers restored
    with PreemptionWatch(strategy, tmp_path) as watch:
        (tmp_path / "STOP").touch()
        assert watch.requested() == str(tmp_path / "STOP")
        watch.done()                                    # used up: a requeued job must not stop at once
        assert not (tmp_path / "STOP").exists() and watch.requested() is None


def test_sigterm_to_a_plain_process_checkpoints_and_exits_75(tiny_model, tmp_path):
    """No launcher: the rank itself gets SIGTERM after step 3, finishes it, saves and exits 75."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    out = tmp_path / "run"
    args = sft_args(tiny_model, out, 2, tmp_path / "cache", "--max_steps", 8, "--save_steps", 0)
    proc = subprocess.run([sys.executable, "step1_sft/main.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "DENSEHF_TERM_AT_STEP": "3"})
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "preempted: SIGTERM: stopped after step 3" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert not (out / "hf_export").exists()


def test_a_second_run_on_a_live_output_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from common.logger import RunLogger
    cfg = SimpleNamespace(output_dir=str(tmp_path), log_steps=1, enable_tensorboard=False)
    main = SimpleNamespace(is_main=True)
    first = RunLogger(cfg, main, "sft")
    with pytest.raises(DensehfError, match=rf"{tmp_path}: in use by a live run \(pid \d+ on "):
        RunLogger(cfg, main, "sft")
    first.close()
    RunLogger(cfg, main, "sft").close()          # free again once the first run ended
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, '.');"
                               "from types import SimpleNamespace as N; from common.logger import RunLogger;"
                               f"run = RunLogger(N(output_dir={str(tmp_path)!r}, log_steps=1, enable_tensorboard=False),"
                               "N(is_main=True), 'x'); print('held', flush=True); import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DensehfError, match="in use by a live run"):
        RunLogger(cfg, main, "sft")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLogger(cfg, main, "sft").close()          # a killed run's lock went with it


# ---- verified checkpoints and write failures ---------------------------------------------
def fake_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    from common.checkpoint import MANIFEST, _manifest
    folder = root / f"step{step:08d}"
    (folder / "model" / "state").mkdir(parents=True)
    (folder / "model" / "state" / "shard.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    if manifest:
        (folder / MANIFEST).write_text(json.dumps(_manifest(folder)))
    (root / "latest").write_text(folder.name)
    return folder


def test_resume_falls_back_past_a_damaged_checkpoint_and_says_why(tmp_path):
    from common.checkpoint import verify
    ckpt = CheckpointManager(DeepSpeedStrategy(SimpleNamespace()), tmp_path)
    old, new = fake_checkpoint(ckpt.root, 5), fake_checkpoint(ckpt.root, 10)
    assert verify(new) is None and ckpt._pick() == new
    shard = new / "model" / "state" / "shard.pt"
    shard.write_bytes(shard.read_bytes()[:100])                      # a crash or a quota cut it short
    assert verify(new) == f"{shard}: 100 bytes, 10240 written"
    assert ckpt._pick() == old and ckpt.damaged == [f"step00000010: {shard}: 100 bytes, 10240 written"]
    blob = old / "model" / "state" / "shard.pt"
    blob.write_bytes(b"\0" * blob.stat().st_size)                    # same size, other bytes
    with pytest.raises(DensehfError, match=r"no intact checkpoint to resume from \(step00000010: .*"
                                           r"step00000005: .*content changed since it was written"):
        ckpt._pick()


def test_a_checkpoint_from_before_manifests_is_taken_as_it_is(tmp_path):
    ckpt = CheckpointManager(DeepSpeedStrategy(SimpleNamespace()), tmp_path)
    folder = fake_checkpoint(ckpt.root, 3, manifest=False)
    assert ckpt._pick() == folder and ckpt.damaged == []


class FullDisk:
    """A trainable engine (it has an optimizer) whose checkpoint write fails as a full filesystem makes it fail."""
    optimizer = object()

    def save_checkpoint(self, path, **kw):
        import errno
        Path(path).mkdir(parents=True)
        (Path(path) / "half_written.pt").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_is_a_clear_error_and_latest_stays(tmp_path):
    ckpt = CheckpointManager(DeepSpeedStrategy(SimpleNamespace()), tmp_path)
    fake_checkpoint(ckpt.root, 5)
    with pytest.raises(DensehfError, match=r"\.tmp-step00000007: writing the step-7 checkpoint failed: .*No space "
                                           r"left on device.*GiB free there, the previous checkpoint took .*"
                                           r"'latest' still points to step00000005"):
        ckpt.save({"model": FullDisk()}, 7, {"step": 7})
    assert not (ckpt.root / ".tmp-step00000007").exists()
    assert (ckpt.root / "latest").read_text() == "step00000005"


def test_no_room_for_another_checkpoint_is_said_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    ckpt = CheckpointManager(DeepSpeedStrategy(SimpleNamespace()), tmp_path)
    fake_checkpoint(ckpt.root, 5)                                    # ~10 KB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(DensehfError, match="no room for the next checkpoint: 0.00 GiB free there, the previous"):
        ckpt.save({"model": FullDisk()}, 7, {"step": 7})
    assert not (ckpt.root / ".tmp-step00000007").exists()


class Payload:
    """What a tampered checkpoint could carry: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


@pytest.mark.parametrize("zero", [2, 3])
def test_checkpoints_load_weights_only_and_refuse_a_pickled_object(tiny_model, tmp_path, zero, monkeypatch):
    """DeepSpeed's own loader unpickles its optimizer-state files; densehf loads them with
    weights_only=True and an allow-list: a real checkpoint round-trips, a tampered file is refused."""
    from transformers import AutoModelForCausalLM

    from common.checkpoint import MANIFEST, _manifest
    from common.config import parse_config
    from common.models import load_model
    from step1_sft.main import SFTConfig
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    cfg = parse_config(SFTConfig, ["--model_name_or_path", tiny_model, "--zero_stage", str(zero)])
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()
    engine = strategy.prepare(load_model(cfg, strategy, AutoModelForCausalLM), 10)
    ids = torch.randint(4, 100, (2, 8))
    strategy.backward(engine, engine(input_ids=ids, labels=ids).loss)
    strategy.step(engine)
    ckpt = CheckpointManager(strategy, tmp_path)
    saved = ckpt.save({"model": engine}, 1, {"step": 1})
    assert ckpt.load({"model": engine})["step"] == 1              # everything in it passes the allow-list
    optim = next(saved.rglob("*optim_states.pt"))
    states = torch.load(optim, weights_only=False)
    states["injected"] = Payload()
    torch.save(states, optim)
    (saved / MANIFEST).write_text(json.dumps(_manifest(saved)))    # a consistent forgery: only the loader stops it
    with pytest.raises(DensehfError, match=r"cannot load this checkpoint \(a file holds a pickled object \(print\) "
                                           r"that is neither a tensor nor one of DeepSpeed's checkpoint classes: "
                                           r"refused, nothing was run\)"):
        ckpt.load({"model": engine})

"""`built_once`: the stage-1/2 runs that both xdist workers start from; the order of the files."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import built_once, pytest_collection_modifyitems


class WorkerTemp:
    """What `tmp_path_factory` gives an xdist worker: its own folder inside the run's."""
    def __init__(self, run, worker):
        self.folder = run / f"popen-{worker}"

    def getbasetemp(self):
        self.folder.mkdir(exist_ok=True)
        return self.folder


def test_two_workers_asking_at_once_get_one_build(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    builds = []

    def build(folder):
        builds.append(folder)
        time.sleep(0.3)  # the other worker asks meanwhile
        (folder / "model").write_text("weights")

    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda w: built_once(WorkerTemp(tmp_path, w), "sft", build), ["gw0", "gw1"]))
    assert folders == [tmp_path / "sft"] * 2 and builds == [tmp_path / "sft"]
    assert (tmp_path / "sft" / "model").read_text() == "weights"


def test_a_failed_build_is_redone_from_scratch_by_the_next_asker(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")

    def failing(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError):
        built_once(WorkerTemp(tmp_path, "gw0"), "sft", failing)
    folder = built_once(WorkerTemp(tmp_path, "gw1"), "sft", lambda f: (f / "model").write_text("weights"))
    assert sorted(p.name for p in folder.iterdir()) == [".built", "model"]


class Item:
    def __init__(self, path, fixtures, slow=True):
        self.path, self.fixturenames, self.slow = path, fixtures, slow

    def get_closest_marker(self, name):
        return "mark" if name == "slow" and self.slow else None


def test_files_in_the_order_that_keeps_both_workers_busy():
    """Stage 3's file first (it builds the shared runs), then slow files needing none of them, then
    those that do, then the in-process files; a file goes where its earliest test goes, and keeps
    its tests together and in order."""
    items = [Item("fast.py", ["tmp_path"], slow=False),
             Item("vllm.py", ["tmp_path"], slow=False), Item("vllm.py", ["sft_runs", "reward_runs"]),
             Item("rlhf.py", ["sft_runs", "rl_runs"]), Item("rlhf.py", ["reward_runs", "rl_runs"]),
             Item("vpl.py", ["vpl_runs"]), Item("vpl.py", ["sft_runs", "vpl_runs"]),
             Item("bench.py", ["tmp_path"])]
    pytest_collection_modifyitems(None, items)
    assert [(i.path, i.fixturenames[0]) for i in items] == [
        ("rlhf.py", "sft_runs"), ("rlhf.py", "reward_runs"), ("vpl.py", "vpl_runs"), ("vpl.py", "sft_runs"),
        ("bench.py", "tmp_path"), ("vllm.py", "tmp_path"), ("vllm.py", "sft_runs"), ("fast.py", "tmp_path")]


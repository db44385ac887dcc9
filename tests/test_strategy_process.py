"""The strategy's process-level shortcuts: DeepSpeed's Muon modules stood in for, scikit-learn kept
out of transformers, and a stage that is the whole program ending without the interpreter's
teardown (each saves about a second a process; a run through the launcher starts two)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.startup import MUON_STAND_INS, skip_muon_import
from tests.conftest import REPO


def test_muon_stand_ins_answer_not_muon_and_fail_if_called(monkeypatch):
    for name in MUON_STAND_INS:
        monkeypatch.delitem(sys.modules, name, raising=False)  # restored after the test
    skip_muon_import()
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import muon_update
    assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), MuonWithAuxAdam)
    with pytest.raises(NotImplementedError, match="never builds DeepSpeed's Muon"):
        muon_update(torch.zeros(2, 2), torch.zeros(2, 2))


PROGRAM = """
import atexit, logging, sys
from common.cli import run_main
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
def main():
    logging.getLogger("densehf").info("logged")
    sys.stdout.write("printed, no newline")
run_main(main, exit_process=True)
print("after run_main")
"""


def test_a_stage_that_is_the_program_exits_0_with_everything_written(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(marker)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "logged" in proc.stdout and proc.stdout.endswith("printed, no newline")  # flushed, then nothing else
    assert marker.read_text() == "atexit ran"


NEEDS_TEARDOWN = """
import sys
from common.cli import run_main
from common.strategy import before_close
class FreedAtTeardown:  # as vLLM's CPU shared memory: unlinked by a destructor
    def __init__(self, path, open_file):  # (module globals may be gone when it runs)
        self.path, self.open_file = path, open_file
    def __del__(self):
        with self.open_file(self.path, "w") as f:
            f.write("freed")
held = FreedAtTeardown(sys.argv[1], open)
before_close(lambda: None, needs_teardown=True)
run_main(lambda: None, exit_process=True)
"""


def test_a_stage_whose_engine_frees_at_teardown_still_gets_the_teardown(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", NEEDS_TEARDOWN, str(marker)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "freed"


NO_SKLEARN_OR_SCIPY = """
import sys
import step1_sft.main, step2_reward.main, step3_rlhf.main
# a stage's imports leave transformers' generation alone, so setup_distributed comes first
assert "transformers.generation.candidate_generator" not in sys.modules
assert "transformers.loss.loss_utils" not in sys.modules
from common.startup import skip_transformers_extras
skip_transformers_extras()
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, num_labels=1, pad_token_id=0)
ids = torch.tensor([[1, 2, 3]])
LlamaForCausalLM(config)(ids, labels=ids).loss.backward()     # the loss functions transformers picks
LlamaForSequenceClassification(config)(ids, labels=torch.tensor([0.5])).loss.backward()
out = LlamaForCausalLM(config).eval().generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
assert out.shape == (1, 5), out.shape
print("imported:", sorted({"sklearn", "scipy"} & set(sys.modules)))
"""


def test_transformers_trains_and_generates_without_importing_scikit_learn_or_scipy():
    proc = subprocess.run([sys.executable, "-c", NO_SKLEARN_OR_SCIPY], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported: []"

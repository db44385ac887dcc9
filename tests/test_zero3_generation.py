"""Generation under ZeRO-3 gathers the weights once per generate call, not per layer per token."""
from __future__ import annotations

import json

import pytest

from tests.conftest import launch

pytestmark = pytest.mark.slow


def test_generation_gathers_the_model_once(tiny_model):
    proc = launch("tests/zero3_generate_probe.py", [tiny_model])
    line = next(x for x in proc.stdout.splitlines() if "PROBE " in x)
    probe = json.loads(line.split("PROBE ", 1)[1])
    model_bytes = probe["model_bytes"]
    for tokens in ("4", "16"):
        # once: at most the whole model, whatever the answer length
        assert probe["gathered"][tokens] <= model_bytes
        assert probe[f"same_tokens_{tokens}"], "gather-once changed the generated tokens"
    assert probe["gathered"]["16"] == pytest.approx(probe["gathered"]["4"], rel=0.01)
    # the counter sees DeepSpeed's default path re-gathering the model at every step
    assert probe["per_layer"]["16"] >= 3.5 * probe["per_layer"]["4"] >= 3.5 * model_bytes

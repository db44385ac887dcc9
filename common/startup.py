"""Imports every densehf process would pay for and never use, skipped before the models load.

Each saves about a second a process, and a run through the launcher starts two.
"""
from __future__ import annotations

import sys
import types


def _never_muon(*args, **kwargs):
    raise NotImplementedError("densehf never builds DeepSpeed's Muon optimizer")


# what DeepSpeed's ZeRO and bf16 optimizers import from its Muon modules on every engine
MUON_STAND_INS = {"deepspeed.runtime.zero.muon.muon_optimizer": {"MuonWithAuxAdam": type("MuonWithAuxAdam", (), {})},
                  "deepspeed.runtime.zero.muon.original_muon": {"muon_update": _never_muon}}


def skip_muon_import() -> None:
    """Answer DeepSpeed's Muon checks without importing Muon (about 0.8 s in every process).

    The optimizers import Muon only to ask whether the optimizer is Muon, and its modules
    compile Muon's kernels when imported (torch._dynamo). Every optimizer here is built by
    the strategy, never Muon, so stand-ins answer "no" (and fail loudly if ever called).
    """
    for name, attrs in MUON_STAND_INS.items():
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name, "stand-in: densehf never builds Muon")
            sys.modules[name].__dict__.update(attrs)


def skip_sklearn_import() -> None:
    """Keep transformers from importing scikit-learn (about 0.9 s in every process).

    transformers imports it whenever it is installed, for one thing: assisted generation's
    confidence calibration, which densehf never uses. The task build needs scikit-learn (the
    gold scorer), so it stays installed and transformers is told it is not. No effect once
    transformers' generation modules are imported.
    """
    import transformers.utils

    if "transformers.generation.candidate_generator" not in sys.modules:
        transformers.utils.is_sklearn_available = lambda: False


def skip_scipy_import() -> None:
    """Keep transformers from importing SciPy (about 0.5 s in every process).

    transformers' loss module imports the object-detection losses, which import SciPy's
    Hungarian matching whenever SciPy is installed; densehf's models (causal LMs and
    sequence scorers) never reach them. No effect once transformers' losses are imported.
    """
    import transformers.utils

    if "transformers.loss.loss_utils" not in sys.modules:
        transformers.utils.is_scipy_available = lambda: False


def skip_unused_imports() -> None:
    """All of the above; the strategy calls it first thing in every process."""
    skip_muon_import()
    skip_sklearn_import()
    skip_scipy_import()

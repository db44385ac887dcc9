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


# transformers' checks for optional packages densehf never needs in a stage, each with the module
# that reads it when imported: scikit-learn (about 0.9 s a process) only for assisted generation's
# confidence calibration; SciPy (about 0.5 s) only for the object-detection losses, which
# `transformers.loss.loss_utils` imports for every model
TRANSFORMERS_UNUSED_EXTRAS = {"is_sklearn_available": "transformers.generation.candidate_generator",
                              "is_scipy_available": "transformers.loss.loss_utils"}


def skip_transformers_extras() -> None:
    """Tell transformers scikit-learn and SciPy are absent, so it does not import them.

    Both stay installed (the task build's gold scorer needs scikit-learn). No effect on a check
    whose reading module is already imported.
    """
    import transformers.utils

    for check, reader in TRANSFORMERS_UNUSED_EXTRAS.items():
        if reader not in sys.modules:
            setattr(transformers.utils, check, lambda: False)


def skip_unused_imports() -> None:
    """All of the above; the strategy calls it first thing in every process."""
    skip_muon_import()
    skip_transformers_extras()

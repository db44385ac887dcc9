"""Shared core of densehf: config, DeepSpeed strategy, models, data, logging, rewards."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

"""Experiments: the reward calculators compared on the embedded task (runner, statistics, report)."""

"""RL algorithms, registered by name: each turns a Rollout into optimizer steps."""
from step3_rlhf.algorithms.base import ALGORITHMS, register_algorithm
from step3_rlhf.algorithms import critic_free, ppo  # noqa: F401  (registration)

__all__ = ["ALGORITHMS", "register_algorithm"]

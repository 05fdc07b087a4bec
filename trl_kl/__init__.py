"""trl_kl: TRL trainers that put the KL penalty of RLHF where the theory says it belongs.

``from trl_kl import GRPOConfig, GRPOTrainer`` is the one-import swap for ``from trl import ...``. The
trainers are imported lazily, so the pure math (``trl_kl.kl``, ``trl_kl.advantages``, ``trl_kl.importance``,
``trl_kl.verify``) loads without TRL.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"GRPOConfig": "grpo", "GRPOTrainer": "grpo", "PPOConfig": "ppo", "PPOTrainer": "ppo", "DPOConfig": "dpo", "DPOTrainer": "dpo"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'trl_kl' has no attribute {name!r}")

"""trl_kl: TRL trainers that put the KL penalty of RLHF where the theory says it belongs."""

__version__ = "0.1.0"

from .grpo import GRPOConfig, GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer"]

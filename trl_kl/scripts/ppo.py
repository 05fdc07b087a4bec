"""``trl-kl ppo``: PPO with a critic and GAE, the KL in the per-token reward; the GRPO script's arguments, data
and rewards, with ``trl_kl.PPOConfig`` / ``PPOTrainer``.

    trl-kl ppo --config ppo                                   # a shipped recipe: the offline toy model and task
"""

from __future__ import annotations

from . import announce_device, train_and_save
from .grpo import GRPOScriptArguments, build_trainer


def make_parser(prog: str | None = None):
    from trl_kl import PPOConfig

    from .grpo import make_parser as make_grpo_parser

    return make_grpo_parser(prog, config=PPOConfig)


def main(script_args, training_args, model_args, dataset_args):
    from trl_kl import PPOTrainer

    announce_device(training_args)
    trainer = build_trainer(script_args, training_args, model_args, dataset_args, trainer_cls=PPOTrainer)
    train_and_save(trainer, training_args, model_args)
    return trainer


__all__ = ["GRPOScriptArguments", "main", "make_parser"]

"""``trl-kl grpo``: TRL's GRPO script (``trl/scripts/grpo.py``) with ``trl_kl.GRPOConfig`` / ``GRPOTrainer``.

    trl-kl grpo --config grpo_offpolicy                       # a shipped recipe: the offline toy model and task
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl_kl._trl import GRPOScriptArguments as TRLGRPOScriptArguments

from . import eval_split, load_datasets, make_trl_parser, model_name, reward_functions, set_model_init_kwargs
from . import announce_device, train_and_save


@dataclass
class GRPOScriptArguments(TRLGRPOScriptArguments):
    """TRL's GRPO script arguments; ``reward_funcs`` also takes reward models and any import path."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: TRL's names (accuracy_reward, reasoning_accuracy_reward, think_format_reward, "
            "get_soft_overlong_punishment), a dotted import path (my_lib.rewards.f, trl_kl.toy.correctness_reward) or "
            "a reward model (hub id or local path, loaded as AutoModelForSequenceClassification with one label)."
        },
    )


def toy_split(n: int, seed: int, split: str):
    from trl_kl.toy import make_dataset

    return make_dataset(n, seed=seed, split=split)


def make_parser(prog: str | None = None, config=None):
    from trl_kl import GRPOConfig

    return make_trl_parser(GRPOScriptArguments, config or GRPOConfig, prog)


def build_trainer(script_args, training_args, model_args, dataset_args, trainer_cls=None):
    """The trainer ``trl-kl grpo`` (and ``ppo``, with ``trainer_cls=PPOTrainer``) trains."""
    from trl import get_peft_config, get_quantization_config

    from trl_kl import GRPOTrainer

    set_model_init_kwargs(training_args, model_args)
    dataset = load_datasets(script_args, dataset_args, training_args.seed, toy_split)
    funcs = reward_functions(script_args)
    if not funcs:
        raise ValueError("No reward: give --reward_funcs (e.g. trl_kl.toy.correctness_reward) or --reward_model_name_or_path.")
    return (trainer_cls or GRPOTrainer)(
        model=model_name(model_args),
        reward_funcs=funcs,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )


def main(script_args, training_args, model_args, dataset_args):
    announce_device(training_args)
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    train_and_save(trainer, training_args, model_args)
    return trainer

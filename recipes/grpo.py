"""GRPO with trl_kl, in TRL's script style.

    accelerate launch recipes/grpo.py --config recipes/grpo_offpolicy.yaml
    accelerate launch recipes/grpo.py --config recipes/grpo_offpolicy.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

``--model_name_or_path toy`` (the YAML's default) is the offline toy policy of ``trl_kl.toy``: no download,
the addition task and its reward functions. Any other name is a hub model or local path; then give a
``--dataset_name`` with a ``prompt`` column and choose ``--reward_funcs`` among TRL's reward functions
(``trl.rewards``) or the toy ones.
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_kl import GRPOConfig, GRPOTrainer, toy
from trl_kl.distributed import end_distributed


@dataclass
class GRPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness_reward", "closeness_reward"],
        metadata={"help": "Reward functions: names from trl_kl.toy or trl.rewards (e.g. accuracy_reward)."},
    )
    toy_train_size: int = field(default=2000, metadata={"help": "Prompts of the toy task (model 'toy' only)."})


def reward_function(name: str):
    """A reward function by name: the toy task's, else one of TRL's (trl.rewards)."""
    if hasattr(toy, name):
        return getattr(toy, name)
    import trl.rewards

    if hasattr(trl.rewards, name):
        return getattr(trl.rewards, name)
    raise ValueError(f"Unknown reward function {name!r}: use one of trl_kl.toy's or trl.rewards'.")


def load_data(script_args: GRPOScriptArguments, training_args, model_args: ModelConfig):
    """(model name or path, train dataset, eval dataset): the offline toy task for ``toy``, else the hub."""
    if model_args.model_name_or_path == "toy":
        model = toy.toy_model_path()
        train_dataset = toy.make_dataset(script_args.toy_train_size, seed=training_args.seed, split="train")
        return model, train_dataset, toy.make_dataset(64, seed=training_args.seed, split="test")
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    eval_dataset = dataset.get(script_args.dataset_test_split)
    return model_args.model_name_or_path, dataset[script_args.dataset_train_split], eval_dataset


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: ModelConfig, trainer_cls=GRPOTrainer):
    model, train_dataset, eval_dataset = load_data(script_args, training_args, model_args)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_function(name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig))
    trainer = main(*parser.parse_args_and_config())
    end_distributed(trainer)  # on CPU (gloo), without it a process can crash at exit

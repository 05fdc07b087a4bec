"""Online (iterative) DPO with an SFT term, with trl_kl, in TRL's script style.

    accelerate launch recipes/dpo_online.py --config recipes/dpo_online.yaml
    accelerate launch recipes/dpo_online.py --config recipes/dpo_online.yaml --resample_every null   # offline DPO
    accelerate launch recipes/dpo_online.py --config recipes/dpo_online.yaml \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name <hub preference dataset> --reward_funcs <name>

``--model_name_or_path toy`` (the YAML's default) is the offline toy policy of ``trl_kl.toy``: no download, the
addition task. Its offline preference data (``offline_preferences``) simulates data from another model: the
chosen answer is the correct sum, the rejected one a wrong number drawn uniformly (0..128), unlike the
policy's own near misses. Any other model name is a hub model or local path; then give a ``--dataset_name``
with ``prompt``/``chosen``/``rejected`` columns (or ``prompt`` only, with resampling) and ``--reward_funcs``
among the toy ones or TRL's (``trl.rewards``), which label the resampled completions.
"""

import random
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from grpo import reward_function  # the GRPO recipe's: trl_kl.toy's or trl.rewards' functions by name
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_kl import DPOConfig, DPOTrainer, toy
from trl_kl.distributed import end_distributed


@dataclass
class DPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness_reward", "closeness_reward"],
        metadata={"help": "Reward functions labelling resampled completions: names from trl_kl.toy or trl.rewards."},
    )
    toy_train_size: int = field(default=2000, metadata={"help": "Preference pairs of the toy task (model 'toy' only)."})
    toy_eval_size: int = field(default=256, metadata={"help": "Held-out toy prompts scored at the end (model 'toy' only)."})


def offline_preferences(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """Toy preference pairs from 'another model': chosen = the correct sum, rejected = a uniformly drawn wrong
    number in 0..128. Columns prompt, chosen, rejected, answer (the reward functions read ``answer``)."""
    problems = toy.make_dataset(n, seed=seed, split=split)
    rng = random.Random(seed + 1)
    rejected = []
    for answer in problems["answer"]:
        wrong = rng.randrange(2 * toy.MAX_OPERAND + 1)
        while wrong == int(answer):
            wrong = rng.randrange(2 * toy.MAX_OPERAND + 1)
        rejected.append(str(wrong))
    return Dataset.from_dict(
        {"prompt": problems["prompt"], "chosen": problems["answer"], "rejected": rejected, "answer": problems["answer"]}
    )


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig):
    is_toy = model_args.model_name_or_path == "toy"
    if is_toy:
        model = toy.toy_model_path()
        train_dataset = offline_preferences(script_args.toy_train_size, seed=training_args.seed)
        eval_dataset = offline_preferences(64, seed=training_args.seed, split="test")
    else:
        model = model_args.model_name_or_path
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        train_dataset = dataset[script_args.dataset_train_split]
        eval_dataset = dataset.get(script_args.dataset_test_split)
    resampling = training_args.resample_every is not None
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
        reward_funcs=[reward_function(name) for name in script_args.reward_funcs] if resampling else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if is_toy and trainer.accelerator.is_main_process:
        held_out = toy.make_dataset(script_args.toy_eval_size, seed=training_args.seed, split="test")
        model = trainer.accelerator.unwrap_model(trainer.model)
        print(f"held-out greedy correctness: {toy.evaluate(model, trainer.processing_class, held_out)['correctness']:.3f}")
    return trainer


if __name__ == "__main__":
    parser = TrlParser((DPOScriptArguments, DPOConfig, ModelConfig))
    trainer = main(*parser.parse_args_and_config())
    end_distributed(trainer)  # on CPU (gloo), without it a process can crash at exit

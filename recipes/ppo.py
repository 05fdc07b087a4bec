"""PPO with trl_kl (critic, GAE, KL in the per-token reward), in TRL's script style.

    accelerate launch recipes/ppo.py --config recipes/ppo.yaml
    accelerate launch recipes/ppo.py --config recipes/ppo.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name <hub dataset with a prompt column> --reward_funcs accuracy_reward

``--model_name_or_path toy`` is the offline toy policy of ``trl_kl.toy`` (no download).
"""

from grpo import GRPOScriptArguments, load_data, reward_function
from trl import ModelConfig, TrlParser, get_peft_config

from trl_kl import PPOConfig, PPOTrainer


def main(script_args: GRPOScriptArguments, training_args: PPOConfig, model_args: ModelConfig):
    model, train_dataset, eval_dataset = load_data(script_args, training_args, model_args)
    trainer = PPOTrainer(
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
    parser = TrlParser((GRPOScriptArguments, PPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())

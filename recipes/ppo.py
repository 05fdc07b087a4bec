"""PPO with trl_kl (critic, GAE, KL in the per-token reward), in TRL's script style.

    accelerate launch recipes/ppo.py --config recipes/ppo.yaml
    accelerate launch recipes/ppo.py --config recipes/ppo.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name <hub dataset with a prompt column> --reward_funcs accuracy_reward

``--model_name_or_path toy`` is the offline toy policy of ``trl_kl.toy`` (no download). Data loading and
reward functions are the GRPO recipe's.
"""

from grpo import GRPOScriptArguments, main
from trl import ModelConfig, TrlParser

from trl_kl import PPOConfig, PPOTrainer
from trl_kl.distributed import end_distributed

if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, PPOConfig, ModelConfig))
    trainer = main(*parser.parse_args_and_config(), trainer_cls=PPOTrainer)
    end_distributed(trainer)  # on CPU (gloo), without it a process can crash at exit

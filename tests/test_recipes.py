"""The recipes run as users launch them: torchrun with 2 processes (CPU/gloo) on the offline toy model."""

import json
from pathlib import Path

import pytest
import yaml
from distributed_run import torchrun

from trl_kl import GRPOConfig, PPOConfig

ROOT = Path(__file__).parent.parent
CONFIGS = {"grpo_offpolicy.yaml": GRPOConfig, "grpo_onpolicy_trl_default.yaml": GRPOConfig, "ppo.yaml": PPOConfig}


def test_every_recipe_yaml_is_checked():
    assert {p.name for p in (ROOT / "recipes").glob("*.yaml")} - {"dpo_online.yaml"} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe_yaml_is_a_valid_config(name, tmp_path):
    values = yaml.safe_load((ROOT / "recipes" / name).read_text())
    values.pop("model_name_or_path")
    values.update(output_dir=str(tmp_path), use_cpu=True)
    args = CONFIGS[name](**values)
    assert args.beta > 0 and args.kl_estimator in ("k1", "k2", "k3")


@pytest.mark.slow
def test_grpo_recipe_under_torchrun(toy_path, tmp_path):
    out = tmp_path / "run"
    args = [
        ROOT / "recipes" / "grpo.py", "--config", ROOT / "recipes" / "grpo_offpolicy.yaml",
        "--output_dir", out, "--max_steps", "4", "--save_steps", "2", "--bf16", "false", "--use_cpu", "true",
    ]
    torchrun(args, tmp_path / "torchrun.log", finished=(out / "model.safetensors").exists, cwd=ROOT)
    checkpoint = out / "checkpoint-2"
    # each process saved the rollout it was still training on (4 steps per generation, checkpoint after 2)
    assert (checkpoint / "trl_kl_rollout_state_rank0.pt").exists()
    assert (checkpoint / "trl_kl_rollout_state_rank1.pt").exists()
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = [row for row in history if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    # on-policy at the first step of a rollout, off-policy after it: the importance weights spread
    assert steps[0]["is/ess"] == 1.0 and steps[-1]["is/ess"] < 1.0
    assert (out / "model.safetensors").exists()


ACCELERATE = {
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
    "fsdp2.yaml": ("FSDP", 8),
    "multi_node.yaml": ("DEEPSPEED", 16),
    "cpu_ddp.yaml": ("MULTI_CPU", 2),
}


def test_every_accelerate_config_is_checked():
    assert {p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")} == set(ACCELERATE)


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / name))
    distributed_type, processes = ACCELERATE[name]
    assert (config.distributed_type.value, config.num_processes) == (distributed_type, processes)
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2

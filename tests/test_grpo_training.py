"""Real training loops of trl_kl.GRPOTrainer on the toy policy: LoRA, checkpoint/resume."""

import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from grpo_batch import make_config
from trl_kl import GRPOTrainer
from trl_kl.toy import correctness_reward, closeness_reward, make_dataset


def _train(toy_path, args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=toy_path,
            reward_funcs=[correctness_reward, closeness_reward],
            args=args,
            train_dataset=make_dataset(64, 0),
            **kwargs,
        )
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer


def _logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.slow
def test_lora_reference_is_the_adapter_disabled_base(toy_path, tmp_path):
    """With LoRA the reference is the base model (adapter off): at the first step the fresh adapter is the
    identity, so the KL is exactly 0; training moves the adapter, not the base weights."""
    args = make_config(tmp_path, max_steps=3, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                       per_device_train_batch_size=16, num_generations=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _train(toy_path, args, peft_config=lora)
    seq_kl = _logged(trainer, "kl/seq_kl")
    assert seq_kl[0] == 0.0 and _logged(trainer, "kl/k1")[0] == 0.0
    assert any(abs(v) > 0 for v in _logged(trainer, "kl/k1")[1:]), "the adapter never moved the policy"
    fresh = AutoModelForCausalLM.from_pretrained(toy_path).state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in trainer.model.get_base_model().state_dict().items()}
    lora = [k for k in trained if "lora_" in k]
    assert lora and any(trained[k].abs().sum() > 0 for k in lora if "lora_B" in k)
    for name, value in fresh.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_gives_the_same_next_steps(toy_path, tmp_path):
    """Train 4 steps with a checkpoint at step 2; resuming from it reproduces steps 3-4 exactly (off-policy
    GRPO with the KL in the reward: rollouts, old/ref log-probs and RNG state all restored)."""
    common = dict(max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2, num_iterations=2,
                  steps_per_generation=2, learning_rate=1e-3)
    full = _train(toy_path, make_config(tmp_path / "a", **common))
    resumed = _train(
        toy_path, make_config(tmp_path / "a", resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"), **common)
    )
    # the resumed history holds steps 1-2 from the checkpoint, then its own steps 3-4
    assert [row["step"] for row in resumed.state.log_history if "loss" in row] == [1, 2, 3, 4]
    assert _logged(resumed, "loss")[2:] == pytest.approx(_logged(full, "loss")[2:], rel=1e-6, abs=1e-8)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

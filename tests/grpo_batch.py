"""Shared by the GRPO tests and the torchrun script: a small trainer on the toy policy and a fixed batch."""

import warnings

import torch

from trl_kl import GRPOConfig, GRPOTrainer
from trl_kl.toy import correctness_reward, make_dataset

B, G = 4, 2  # 2 prompts x 2 completions


def make_config(tmp_path, cls=GRPOConfig, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=B,
        num_generations=G,
        max_completion_length=4,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; these tests compare float32 numbers
        beta=0.1,
        epsilon=0.2,
        loss_type="grpo",
        seed=0,
    )
    base.update(overrides)
    return cls(**base)


def make_trainer(toy_path, args, cls=GRPOTrainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=toy_path, reward_funcs=[correctness_reward], args=args, train_dataset=make_dataset(16, 0))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


PROMPTS = ["12+34=", "12+34=", "7+8=", "7+8=", "51+20=", "51+20=", "3+99=", "3+99="]
COMPLETIONS = ["46", "47", "15", "1", "71", "7", "102", "12"]
ADVANTAGES = [1.0, -1.0, 0.7, -0.7, 0.3, -0.3, 1.2, -1.2]


def assert_same_rollout_advantages(ours, stock):
    """``stock`` takes ``ours``'s weights; from the same seed both trainers sample the same completions of 2 toy
    prompts x 2 and give them the same advantages."""
    stock.model.load_state_dict(ours.model.state_dict())
    inputs = [{"prompt": p, "answer": a} for p, a in zip(["12+34="] * 2 + ["7+8="] * 2, ["46"] * 2 + ["15"] * 2)]
    rollouts = []
    for trainer in (ours, stock):
        torch.manual_seed(0)
        rollouts.append(trainer._generate_and_score_completions(inputs))
    assert torch.equal(rollouts[0]["completion_ids"], rollouts[1]["completion_ids"])
    torch.testing.assert_close(rollouts[0]["advantages"], rollouts[1]["advantages"], rtol=0, atol=1e-6)


def loss_and_gradient(trainer, batch):
    """``trainer._compute_loss`` on a copy of ``batch`` and the flattened gradient it gives the policy."""
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def fixed_batch(trainer, seed=0, rows=B):
    """A fixed rollout of ``rows`` completions (toy prompts, right-padded completions ending in eos), with
    old/ref log-probs at seeded offsets from the current policy's, so the importance ratio is not 1
    (an off-policy batch). Returns ``(batch, current log-probs)``."""
    tok = trainer.processing_class
    prompts = tok(PROMPTS[:rows], return_tensors="pt", padding=True, padding_side="left")
    completion = tok(COMPLETIONS[:rows], return_tensors="pt", padding=True, padding_side="right")
    lengths = completion.attention_mask.sum(1)
    completion_ids = torch.cat([completion.input_ids, torch.full((rows, 1), tok.pad_token_id)], dim=1)
    completion_ids[torch.arange(rows), lengths] = tok.eos_token_id
    completion_mask = (torch.arange(completion_ids.size(1))[None] <= lengths[:, None]).long()
    input_ids = torch.cat([prompts.input_ids, completion_ids], 1)
    attention = torch.cat([prompts.attention_mask, completion_mask], 1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, completion_ids.size(1))[0]
    gen = torch.Generator().manual_seed(seed)
    old = logps + 0.15 * torch.randn(logps.shape, generator=gen)
    ref = logps + 0.5 * torch.randn(logps.shape, generator=gen)
    batch = dict(
        prompt_ids=prompts.input_ids,
        prompt_mask=prompts.attention_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.tensor(ADVANTAGES[:rows]),
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=completion_mask.sum(),
    )
    return batch, logps

"""trl_kl.PPOTrainer: per-token rewards, GAE, policy and value losses against hand computations."""

import dataclasses
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_batch import B, fixed_batch
from trl_kl import PPOConfig, PPOTrainer, toy
from trl_kl.advantages import gae, masked_whiten
from trl_kl.ppo import token_rewards, value_loss


def ppo_config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=B, max_completion_length=4, report_to="none",
        use_cpu=True, bf16=False, beta=0.1, epsilon=0.2, loss_type="grpo", seed=0, vf_coef=0.5,
        cliprange_value=0.2, gamma=0.9, lam=0.8,
    )
    base.update(overrides)
    return PPOConfig(**base)


def ppo_trainer(toy_path, args, reward_funcs=(toy.correctness_reward,), train_size=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PPOTrainer(
            model=toy_path, reward_funcs=list(reward_funcs), args=args, train_dataset=toy.make_dataset(train_size, 0)
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def test_token_rewards_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    penalty = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    rewards = token_rewards(torch.tensor([1.0, float("nan")]), penalty, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0]])
    # token 0: unclipped (1-0)^2 = 1, clipped V=0.7 -> 0.49: max 1. token 1: (0-1)^2 = 1, clipped 0.3 -> 0.49: max 1
    loss, clip_frac = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert clip_frac.item() == 0.0
    # the clipped term wins when the update moves *towards* the return past the clip
    loss, clip_frac = value_loss(torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and clip_frac.item() == 1.0


def test_rollout_advantages_are_gae_of_kl_shaped_token_rewards(toy_path, tmp_path):
    seen = []

    def reward(completions, answer, **kwargs):
        values = [0.3 * len(c) for c in completions]
        seen.append(torch.tensor(values))
        return values

    trainer = ppo_trainer(toy_path, ppo_config(tmp_path), reward_funcs=[reward])
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p, "answer": "0"} for p in ["12+34=", "7+8=", "5+5=", "60+1="]])
    mask = out["completion_mask"].float()
    penalty = out["old_per_token_logps"] - out["ref_per_token_logps"]  # k1 (eq. 20)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        values = trainer.value_model(input_ids=ids, attention_mask=attention).logits[..., 0]
    values = values[:, -mask.shape[1] - 1 : -1]
    rewards = -0.1 * penalty * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(B), last] += seen[-1]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out["advantages"], masked_whiten(advantages, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["returns"], returns, rtol=1e-5, atol=1e-5)
    assert out["advantages"].shape == mask.shape
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("objective/", "val/"))}
    seq_kl = (penalty * mask).sum(1)
    expected = {
        "objective/scores": seen[-1].mean(),
        "objective/kl": seq_kl.mean(),
        "objective/rlhf_reward": (seen[-1] - 0.1 * seq_kl).mean(),
        "val/values": (values * mask).sum() / mask.sum(),
        "val/returns": (returns * mask).sum() / mask.sum(),
    }
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_policy_and_value_losses_on_a_fixed_batch(toy_path, tmp_path):
    """Policy: TRL's clipped surrogate on the given per-token advantages (no KL term: it is in the rewards).
    Critic: vf_coef * clipped value loss, backpropagated into the value model only."""
    trainer = ppo_trainer(toy_path, ppo_config(tmp_path, num_iterations=2))
    batch, logps = fixed_batch(trainer)
    mask = batch["completion_mask"].float()
    gen = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.randn(mask.shape, generator=gen) * mask
    batch["old_values"] = torch.randn(mask.shape, generator=gen) * mask
    batch["returns"] = torch.randn(mask.shape, generator=gen) * mask

    rho = torch.exp(logps - batch["old_per_token_logps"])
    A = batch["advantages"]
    per_token = -torch.min(rho * A, rho.clamp(0.8, 1.2) * A)
    expected_policy = ((per_token * mask).sum(1) / mask.sum(1)).mean()

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    values = trainer.value_model(input_ids=ids, attention_mask=attention).logits[..., 0][:, -mask.shape[1] - 1 : -1]
    clipped = batch["old_values"] + (values - batch["old_values"]).clamp(-0.2, 0.2)
    expected_value = 0.5 * (torch.max((values - batch["returns"]) ** 2, (clipped - batch["returns"]) ** 2) * mask).sum() / mask.sum()
    (expected_value_grad,) = torch.autograd.grad(0.5 * expected_value, [trainer.value_model.score.weight])

    trainer.value_model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected_policy, rtol=1e-5, atol=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["loss/value_avg"][-1] == pytest.approx(expected_value.item(), rel=1e-5)
    torch.testing.assert_close(trainer.value_model.score.weight.grad, expected_value_grad, rtol=1e-5, atol=1e-7)


BAD = [
    (dict(gamma=1.5), "gamma must be in"),
    (dict(lam=-0.1), "lam must be in"),
    (dict(cliprange_value=0.0), "cliprange_value"),
    (dict(vf_coef=-1.0), "vf_coef"),
    (dict(value_learning_rate=0.0), "value_learning_rate"),
    (dict(num_generations=0), "num_generations must be"),
    (dict(kl_estimator="k1", kl_placement="loss"), "zero expected gradient"),
    (dict(per_device_train_batch_size=1), "per_device_train_batch_size >= 2"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m for _, m in BAD])
def test_invalid_ppo_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ppo_config(tmp_path, **overrides)


@pytest.mark.parametrize("name", ["kl_reward_scope", "clip_std_min", "clip_std_max"])
def test_ppo_config_has_no_grpo_baseline_fields(tmp_path, name):
    """GRPO's group-baseline fields are not PPOConfig's: PPO carries the penalty with GAE and whitens."""
    from trl_kl import GRPOConfig

    assert name in {f.name for f in dataclasses.fields(GRPOConfig)}
    assert name not in {f.name for f in dataclasses.fields(PPOConfig)}
    with pytest.raises(TypeError, match=name):
        ppo_config(tmp_path, **{name: 0.1})


def test_num_generations_one_is_the_default(tmp_path):
    args = ppo_config(tmp_path)
    assert args.num_generations == 1 and args.generation_batch_size == B


@pytest.mark.slow
def test_ppo_learns_the_toy_task_with_bounded_kl(toy_path, tmp_path):
    """60 steps of PPO (k1 in the reward, off-policy reuse) raise held-out sampled correctness by >= 0.03
    (measured: 0.190 -> 0.243 at seed 0) while the sequence KL to the reference stays below 1 nat;
    the checkpoint holds the critic and its optimizer."""
    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    held_out = toy.make_dataset(200, 0, "test")
    before = toy.evaluate(AutoModelForCausalLM.from_pretrained(toy_path), tokenizer, held_out, num_samples=4, temperature=1.0)
    args = ppo_config(
        tmp_path, per_device_train_batch_size=64, steps_per_generation=2, num_iterations=2, learning_rate=3e-4,
        value_learning_rate=1e-3, beta=0.04, max_steps=60, logging_steps=1, save_strategy="steps", save_steps=60,
        gamma=1.0, lam=0.95, vf_coef=0.1, loss_type="dapo", disable_tqdm=True,
    )
    trainer = ppo_trainer(toy_path, args, reward_funcs=(toy.correctness_reward, toy.closeness_reward), train_size=2000)
    trainer.train()
    assert trainer.state.global_step == 60
    after = toy.evaluate(trainer.model, tokenizer, held_out, num_samples=4, temperature=1.0)
    assert after["correctness"] >= before["correctness"] + 0.03, (before, after)
    kls = [row["objective/kl"] for row in trainer.state.log_history if "objective/kl" in row]
    assert max(kls) < 1.0
    checkpoint = tmp_path / "out" / "checkpoint-60"
    assert (checkpoint / "value_model" / "config.json").exists() and (checkpoint / "value_optimizer.pt").exists()


# ---------------------------------------------------------------------------------------------------
# The critic's optimizer step, checkpoint and the logged policy loss
# ---------------------------------------------------------------------------------------------------


def test_critic_gradient_is_clipped_at_max_grad_norm(toy_path, tmp_path):
    """The critic's gradient norm is clipped to max_grad_norm before its optimizer steps (as TRL clips the policy)."""
    trainer = ppo_trainer(toy_path, ppo_config(tmp_path, max_grad_norm=0.5))
    for p in trainer.value_model.parameters():
        p.grad = torch.full_like(p, 3.0)
    norms = []
    step = trainer.value_optimizer.step
    trainer.value_optimizer.step = lambda: norms.append(
        torch.cat([p.grad.flatten() for p in trainer.value_model.parameters()]).norm().item()
    ) or step()
    trainer._critic_optimizer_step()
    assert norms == [pytest.approx(0.5, rel=1e-4)]
    assert all(p.grad is None or (p.grad == 0).all() for p in trainer.value_model.parameters())  # zeroed after


def test_critic_and_its_optimizer_are_restored_on_resume(toy_path, tmp_path):
    """A checkpoint holds the critic and its optimizer; loading it puts both back, whatever happened since."""
    trainer = ppo_trainer(toy_path, ppo_config(tmp_path))
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    for p in trainer.value_model.parameters():  # one critic step, so the optimizer has state
        p.grad = torch.ones_like(p)
    trainer.value_optimizer.step()
    saved_weights = {k: v.clone() for k, v in trainer.value_model.state_dict().items()}
    saved_steps = [s["step"].clone() for s in trainer.value_optimizer.state.values()]
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    trainer.value_optimizer.step()  # moves the weights and the optimizer state on
    with torch.no_grad():
        for p in trainer.value_model.parameters():
            p.add_(1.0)
    trainer._load_optimizer_and_scheduler(str(tmp_path / "out" / "checkpoint-3"))
    for key, value in trainer.value_model.state_dict().items():
        torch.testing.assert_close(value, saved_weights[key], rtol=0, atol=0)
    assert [s["step"] for s in trainer.value_optimizer.state.values()] == saved_steps


def test_logged_policy_loss_is_not_divided_by_gradient_accumulation(toy_path, tmp_path):
    """TRL divides the returned loss by the gradient accumulation; ``loss/policy_avg`` logs the micro-batch's own
    value, the same whatever the accumulation."""
    trainer = ppo_trainer(toy_path, ppo_config(tmp_path, num_iterations=2))
    batch, _ = fixed_batch(trainer)
    mask = batch["completion_mask"].float()
    gen = torch.Generator().manual_seed(1)
    for key in ("advantages", "old_values", "returns"):
        batch[key] = torch.randn(mask.shape, generator=gen) * mask
    logged = {}
    for accumulation in (1, 4):
        trainer.current_gradient_accumulation_steps = accumulation
        loss = trainer._compute_loss(trainer.model, dict(batch))
        logged[accumulation] = (loss.item(), trainer._metrics["train"]["loss/policy_avg"][-1])
    assert logged[4][0] == pytest.approx(logged[1][0] / 4, rel=1e-5)
    assert logged[4][1] == pytest.approx(logged[1][1], rel=1e-5)
    assert logged[1][1] == pytest.approx(logged[1][0], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# TRL's trainer argument order, and the former trl.PPOTrainer's arguments
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_path(toy_path, tmp_path_factory):
    """A sequence-classification reward model (the toy backbone, a seeded scalar head) saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(toy_path, num_labels=1)
    path = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(toy_path).save_pretrained(path)
    return str(path)


def _build(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PPOTrainer(*args, **kwargs)


def _reward_model_scores(trainer, reward_model):
    """The trainer's rewards for two fixed completions, next to the reward model's own score of prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    if isinstance(reward_model, str):
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model, num_labels=1)
    prompts, completions = ["12+34=", "7+8="], ["46", "1"]
    inputs = [{"prompt": p, "answer": "0"} for p in prompts]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, [[5], [6]])
    tokenizer = trainer.processing_class
    with torch.no_grad():
        own = torch.stack([reward_model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0]
                           for p, c in zip(prompts, completions)])
    return rewards, own


def test_positional_order_is_trls(toy_path, tmp_path):
    """model, reward_funcs, args, train_dataset, eval_dataset, processing_class: TRL's trainers' order."""
    train, evaluation = toy.make_dataset(16, 0), toy.make_dataset(8, 1)
    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    trainer = _build(toy_path, [toy.correctness_reward], ppo_config(tmp_path), train, evaluation, tokenizer)
    assert trainer.train_dataset is train and trainer.eval_dataset is evaluation
    assert trainer.processing_class is tokenizer
    assert trainer.reward_funcs == [toy.correctness_reward]


def test_value_model_and_processing_class_by_keyword(toy_path, tmp_path):
    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(toy_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    trainer = _build(model=toy_path, reward_funcs=toy.correctness_reward, args=ppo_config(tmp_path),
                     train_dataset=toy.make_dataset(16, 0), value_model=critic, processing_class=tokenizer)
    assert trainer.accelerator.unwrap_model(trainer.value_model) is critic
    assert trainer.processing_class is tokenizer


@pytest.mark.parametrize("form", ["model", "path"])
def test_reward_model_is_scored_like_a_grpo_reward_model(toy_path, tmp_path, reward_model_path, form):
    """``reward_model=`` (TRL's former argument), a model or a path: appended to the reward functions and scored by
    TRL's reward-model path, i.e. its scalar output on prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    reward_model = reward_model_path
    if form == "model":
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    trainer = _build(model=toy_path, args=ppo_config(tmp_path), train_dataset=toy.make_dataset(16, 0),
                     reward_model=reward_model)
    assert len(trainer.reward_funcs) == 1 and isinstance(trainer.reward_funcs[0], torch.nn.Module)
    rewards, own = _reward_model_scores(trainer, reward_model)
    assert rewards.shape == (2, 1) and own.abs().max() > 0
    torch.testing.assert_close(rewards[:, 0], own, rtol=1e-5, atol=1e-6)


def test_reward_model_next_to_reward_funcs(toy_path, tmp_path, reward_model_path):
    trainer = _build(toy_path, [toy.correctness_reward], ppo_config(tmp_path), toy.make_dataset(16, 0),
                     reward_model=reward_model_path)
    assert trainer.reward_funcs[0] is toy.correctness_reward and isinstance(trainer.reward_funcs[1], torch.nn.Module)
    rewards, own = _reward_model_scores(trainer, reward_model_path)
    torch.testing.assert_close(rewards[:, 1], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda path, args: PPOTrainer(model=path, args=args), ValueError, "needs a reward"),
    (lambda path, args: PPOTrainer(args, AutoTokenizer.from_pretrained(path), path), TypeError, "model first"),
    (lambda path, args: PPOTrainer(path, [toy.correctness_reward], args, ref_model=path), ValueError, "no ref_model"),
], ids=["no-reward", "former-positional-order", "ref_model"])
def test_former_call_styles_that_cannot_work_say_why(toy_path, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(toy_path, ppo_config(tmp_path))

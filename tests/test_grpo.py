"""trl_kl.GRPOTrainer against hand-computed eq. 39 losses and stock TRL, on fixed batches."""

import math
import warnings

import pytest
import torch
import trl

from grpo_batch import B, assert_same_rollout_advantages, fixed_batch, loss_and_gradient, make_config, make_trainer
from trl_kl import GRPOConfig, GRPOTrainer, kl
from trl_kl.toy import correctness_reward, make_dataset


def _hand_eq39_loss(logps, batch, penalty, beta, eps, scope):
    """Eq. 39 by hand: R = A - beta * (carried penalty); loss = -min(rho R, clip(rho) R), 'grpo' averaging."""
    mask = batch["completion_mask"].float()
    T = mask.shape[1]
    carried = torch.zeros_like(penalty)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                if scope == "token":
                    carried[b, t] = penalty[b, t]
                elif scope == "return_to_go":
                    carried[b, t] = sum(penalty[b, u] for u in range(t, T) if mask[b, u])
                else:
                    carried[b, t] = sum(penalty[b, u] for u in range(T) if mask[b, u])
    R = batch["advantages"][:, None] - beta * carried
    rho = torch.exp(logps - batch["old_per_token_logps"])
    per_token = -torch.min(rho * R, rho.clamp(1 - eps, 1 + eps) * R)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("scope", ["token", "return_to_go", "sequence"])
def test_k1_in_reward_matches_hand_computed_eq39(toy_path, tmp_path, scope):
    trainer = make_trainer(toy_path, make_config(tmp_path, kl_reward_scope=scope, num_iterations=2))
    batch, logps = fixed_batch(trainer)
    assert not torch.allclose(logps, batch["old_per_token_logps"])  # off-policy: ratio != 1
    penalty = batch["old_per_token_logps"] - batch["ref_per_token_logps"]  # eq. 20: log(pi_old / pi_ref)
    expected = _hand_eq39_loss(logps, batch, penalty, 0.1, 0.2, scope)
    loss = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert batch["advantages"].dim() == 1  # the rollout's advantages are not overwritten across iterations


def test_k3_moved_into_reward_matches_hand_computed_eq35(toy_path, tmp_path):
    with pytest.warns(UserWarning, match="biased"):
        kl._warned.clear()
        args = make_config(tmp_path, kl_estimator="k3", kl_reward_scope="token", num_iterations=2)
    trainer = make_trainer(toy_path, args)
    batch, logps = fixed_batch(trainer)
    penalty = 1 - torch.exp(batch["ref_per_token_logps"] - batch["old_per_token_logps"])  # eq. 35
    expected = _hand_eq39_loss(logps, batch, penalty, 0.1, 0.2, "token")
    torch.testing.assert_close(trainer._compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_sequence_scope_adds_the_summed_penalty_after_group_normalisation(toy_path, tmp_path):
    """kl_reward_scope='sequence' is the exact form (docs/theory.md#sequence-kl): the rollout's advantages are the
    group-normalised rewards alone, and each token's advantage becomes A_i - beta * S_i, S_i = sum_t
    log(pi_old/pi_ref) over completion i; the group std never rescales the KL. A group of equal rewards has A = 0,
    so on-policy (ratio 1, 'grpo' averaging) the loss is exactly beta * mean_i S_i: it moves with beta."""

    def constant_reward(completions, **kwargs):
        return [0.5] * len(completions)

    args = make_config(tmp_path, kl_reward_scope="sequence", beta=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=toy_path, reward_funcs=[constant_reward], args=args,
                              train_dataset=make_dataset(8, 0))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():  # the reference starts as a copy of the policy: move it, so the KL is not 0
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(0)
    inputs = [{"prompt": p, "answer": a} for p, a in zip(["12+34="] * 2 + ["7+8="] * 2, ["46"] * 2 + ["15"] * 2)]
    out = trainer._generate_and_score_completions(inputs)
    assert out.get("old_per_token_logps") is None  # on-policy: no extra forward for the sequence scope
    assert torch.equal(out["advantages"], torch.zeros(B))  # equal rewards: no KL in the rollout's advantages
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    K = out["completion_ids"].size(1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, K)[0]
    mask = out["completion_mask"].float()
    S = ((logps - out["ref_per_token_logps"]) * mask).sum(1)
    assert S.abs().min() > 0  # the reference differs from the policy here: a real penalty
    losses = {}
    for beta in (0.01, 10.0):
        trainer.kl_coef = beta
        losses[beta] = trainer._compute_loss(trainer.model, dict(out)).item()
        assert losses[beta] == pytest.approx(beta * S.mean().item(), rel=1e-5, abs=1e-8)


def test_k2_as_loss_matches_hand_computed(toy_path, tmp_path):
    """Loss placement off-policy: TRL's surrogate on A, plus beta * mean(rho_detached * k2)."""
    trainer = make_trainer(toy_path, make_config(tmp_path, kl_estimator="k2", kl_placement="loss", num_iterations=2))
    batch, logps = fixed_batch(trainer)
    mask = batch["completion_mask"].float()
    zero = torch.zeros_like(logps)
    surrogate = _hand_eq39_loss(logps, batch, zero, 0.0, 0.2, "token")
    rho = torch.exp(logps - batch["old_per_token_logps"])
    k2 = 0.5 * (logps - batch["ref_per_token_logps"]) ** 2
    expected = surrogate + 0.1 * ((rho * k2 * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(trainer._compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_k3_loss_with_bias_correction_equals_stock_trl(toy_path, tmp_path, loss_type):
    """kl_estimator='k3', kl_placement='loss', use_bias_correction_kl=True is exactly stock TRL 1.16's KL term:
    same loss value and same gradient, for every loss_type (pins _aggregate_like_trl to TRL's normalisers)."""
    common = dict(loss_type=loss_type, num_iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_args = make_config(tmp_path, kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True, **common)
    ours = make_trainer(toy_path, ours_args)
    stock = make_trainer(toy_path, make_config(tmp_path, cls=trl.GRPOConfig, **common), cls=trl.GRPOTrainer)
    stock.model.load_state_dict(ours.model.state_dict())
    batch, _ = fixed_batch(ours)
    losses, grads = zip(*(loss_and_gradient(trainer, batch) for trainer in (ours, stock)))
    # float32, summed in another order: equal to rounding
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_beta_zero_equals_stock_trl(toy_path, tmp_path):
    """beta = 0: same advantages from the same rollout (our clip_std-aware normalisation reproduces TRL's),
    and the same loss on the same fixed batch."""
    ours = make_trainer(toy_path, make_config(tmp_path, beta=0.0))
    stock = make_trainer(toy_path, make_config(tmp_path, cls=trl.GRPOConfig, beta=0.0), cls=trl.GRPOTrainer)
    assert_same_rollout_advantages(ours, stock)
    batch, _ = fixed_batch(ours)
    batch.pop("ref_per_token_logps")
    torch.testing.assert_close(ours._compute_loss(ours.model, dict(batch)), stock._compute_loss(stock.model, dict(batch)))


def test_metrics_are_logged(toy_path, tmp_path):
    trainer = make_trainer(toy_path, make_config(tmp_path, num_iterations=2))
    batch, logps = fixed_batch(trainer)
    trainer._compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mask = batch["completion_mask"].float()
    seq_kl = ((batch["old_per_token_logps"] - batch["ref_per_token_logps"]) * mask).sum(1).mean()
    assert metrics["kl/seq_kl"] == pytest.approx(seq_kl.item(), rel=1e-5)
    w = torch.exp(((logps - batch["old_per_token_logps"]) * mask).sum(1)).double()
    assert metrics["is/ess"] == pytest.approx((w.sum() ** 2 / (len(w) * (w**2).sum())).item(), rel=1e-5)
    ratio = torch.exp(logps - batch["old_per_token_logps"])
    assert metrics["is/ratio_max"] == pytest.approx(ratio[mask.bool()].max().item(), rel=1e-5)
    for key in ("kl/k1", "kl/k2", "kl/k3", "kl/reward_penalty", "is/ratio_mean", "is/clip_frac", "kl"):
        assert math.isfinite(metrics[key])


def test_penalty_is_formed_once_per_micro_batch(toy_path, tmp_path, monkeypatch):
    """The reward penalty shapes the advantages and is logged as ``kl/reward_penalty`` from one computation."""
    trainer = make_trainer(toy_path, make_config(tmp_path, num_iterations=2))
    batch, _ = fixed_batch(trainer)
    calls = []
    real = kl.reward_penalty
    monkeypatch.setattr(kl, "reward_penalty", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    trainer._compute_loss(trainer.model, batch)
    assert len(calls) == 1
    mask = batch["completion_mask"].bool()
    expected = (batch["old_per_token_logps"] - batch["ref_per_token_logps"])[mask].mean()  # k1: log(pi_old/pi_ref)
    assert trainer._metrics["train"]["kl/reward_penalty"][-1] == pytest.approx(expected.item(), rel=1e-5)
    assert "kl/penalty" not in trainer._metrics["train"] and "kl/loss_term" not in trainer._metrics["train"]


BAD_CONFIGS = [
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(kl_placement="advantage"), "kl_placement must be one of"),
    (dict(kl_reward_scope="episode"), "kl_reward_scope must be one of"),
    (dict(kl_estimator="k1", kl_placement="loss"), "zero expected gradient"),
    (dict(kl_estimator="k2", kl_placement="reward"), "always positive"),
    (dict(kl_estimator="full", kl_placement="reward"), "does not depend on the sampled token"),
    (dict(k3_clip_max=1.0), "k3_clip_max"),
    (dict(k3_clip_max=float("inf")), "k3_clip_max"),
    (dict(clip_std_min=0.5, clip_std_max=0.1), "clip_std_min"),
    (dict(clip_std_min=0.0), "clip_std_min must be a finite number > 0"),
    (dict(clip_std_max=-1.0), "clip_std_max must be a finite number > 0"),
    (dict(beta=-0.1), "beta must be"),
    (dict(beta=float("nan")), "beta must be"),
    (dict(scale_rewards="sequence"), "scale_rewards must be one of"),
    (dict(use_bias_correction_kl=True), "use_bias_correction_kl"),
    (dict(use_bias_correction_kl=True, kl_placement="loss", kl_estimator="k2"), "use_bias_correction_kl"),
    (dict(multi_objective_aggregation="normalize_then_sum", clip_std_min=0.1), "sum_then_normalize"),
    (dict(loss_type="vespo"), "vespo"),
    (dict(full_kl_vocab_chunk_size=1024), "only kl_estimator='full'"),
    (dict(kl_estimator="k2", kl_placement="loss", kl_reward_scope="token"), "with kl_placement='loss' there is none"),
    (dict(k3_clip_max=5.0), "only acts with kl_estimator='k3_clip'"),
    (dict(scale_rewards="none", clip_std_min=0.1), "divides by nothing"),
    (dict(kl_estimator="full", kl_placement="loss", full_kl_token_chunk_size=0), "token_chunk_size must be"),
    (dict(kl_estimator="full", kl_placement="loss", full_kl_vocab_chunk_size=-8), "vocab_chunk_size must be"),
    (dict(num_generations=3), "divisible by num_generations"),
    (dict(num_generations=1, per_device_train_batch_size=4), "at least 2 generations"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_invalid_config_raises_clearly(tmp_path, overrides, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            make_config(tmp_path, **overrides)


def test_unsound_allowed_for_ablation(tmp_path):
    args = make_config(tmp_path, kl_estimator="k2", kl_placement="reward", allow_unsound_kl=True)
    assert args.kl_estimator == "k2"


def test_stock_config_is_refused(toy_path, tmp_path):
    with pytest.raises(TypeError, match="trl_kl.GRPOConfig"):
        GRPOTrainer(model=toy_path, reward_funcs=[correctness_reward], args=make_config(tmp_path, cls=trl.GRPOConfig))


def test_trlparser_reads_the_kl_fields(tmp_path):
    parser = trl.TrlParser((GRPOConfig,))
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--beta", "0.04", "--kl_estimator", "k2", "--kl_placement", "loss",
         "--clip_std_min", "0.1", "--num_generations", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true"]
    )
    assert (args.kl_estimator, args.kl_placement, args.clip_std_min) == ("k2", "loss", 0.1)


def test_adaptive_kl_coef_closed_form():
    # Ziegler et al.: e = clip(kl/target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert kl.adaptive_kl_coef(0.1, 0.3, 0.2, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +0.2
    assert kl.adaptive_kl_coef(0.1, 0.19, 0.2, 1000, 100) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert kl.adaptive_kl_coef(0.1, 0.0, 0.2, 1000, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_adaptive_kl_updates_beta_after_each_optimizer_step(toy_path, tmp_path):
    """Two micro-steps of one optimizer step: beta moves once, with the mean sequence KL of both batches."""
    args = make_config(tmp_path, num_iterations=2, kl_target=0.01, kl_horizon=50.0, gradient_accumulation_steps=2)
    trainer = make_trainer(toy_path, args)
    trainer.current_gradient_accumulation_steps = 2
    batches = [fixed_batch(trainer, seed=seed)[0] for seed in (0, 1)]
    trainer._buffered_inputs, trainer._step = batches, 2  # mid-rollout: TRL serves the buffered batches
    seq_kls = []
    for batch in batches:
        mask = batch["completion_mask"].float()
        seq_kls.append(((batch["old_per_token_logps"] - batch["ref_per_token_logps"]) * mask).sum(1))
        trainer.training_step(trainer.model, [{}], batch["num_items_in_batch"])
        assert trainer.kl_coef == 0.1 or len(seq_kls) == 2  # unchanged until the optimizer step ends
    observed = torch.cat(seq_kls).mean().item()
    error = min(max(observed / 0.01 - 1, -0.2), 0.2)
    assert trainer.kl_coef == pytest.approx(0.1 * (1 + error * 2 * B / 50.0), rel=1e-6)
    assert trainer._metrics["train"]["kl/coef"][-1] == trainer.kl_coef
    assert trainer.beta == 0.1  # TRL's switch (reference log-probs at rollout) stays the config's


@pytest.mark.parametrize("overrides, message", [
    (dict(kl_target=0.0), "kl_target must be"),
    (dict(kl_target=0.1, beta=0.0), "initial beta > 0"),
    (dict(kl_horizon=0.0), "kl_horizon must be"),
])
def test_invalid_adaptive_kl_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)

"""Numerical guarantees of trl_kl's GRPO loss, through ``GRPOTrainer._compute_loss`` on fixed batches (issue #9,
docs/reliability.md): finite loss, gradient and metrics at log-ratios of +-50, with empty completions and on a
policy that puts probability ~1 on its token; advantages exactly 0 for equal or unscorable (NaN) rewards;
``kl/clamp_frac`` > 0 exactly when a log-ratio passes ``kl.LOG_RATIO_BOUND``; KL arithmetic in float32 whatever
the log-probs' dtype or autocast; the KL metrics logged for every estimator from the one policy forward.

The pure functions' own numerics (estimators at log r = +-50 and +-1e4, bf16 inputs, the exp clamp's exact
values; NaN and constant groups, the clip_std paper example) are in tests/test_kl.py and tests/test_advantages.py.
"""

import math
import warnings

import pytest
import torch

from grpo_batch import fixed_batch, make_config, make_trainer
from trl_kl import GRPOTrainer, kl
from trl_kl.advantages import group_normalized_advantages
from trl_kl.grpo import _MicroBatch
from trl_kl.toy import make_dataset

ROWS = 8
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
# every estimator x placement the config accepts (unsound pairs as ablations; 'full' is refused by the config)
PAIRS = {
    "k1-reward": dict(kl_estimator="k1", kl_placement="reward"),
    "k1-reward-token": dict(kl_estimator="k1", kl_placement="reward", kl_reward_scope="token"),
    "k3-reward": dict(kl_estimator="k3", kl_placement="reward"),
    "k3_clip-reward": dict(kl_estimator="k3_clip", kl_placement="reward"),
    "k2-reward": dict(kl_estimator="k2", kl_placement="reward", allow_unsound_kl=True),
    "k2-loss": dict(kl_estimator="k2", kl_placement="loss"),
    "k1-loss": dict(kl_estimator="k1", kl_placement="loss", allow_unsound_kl=True),
    "k3-loss": dict(kl_estimator="k3", kl_placement="loss"),
    "k3_clip-loss": dict(kl_estimator="k3_clip", kl_placement="loss"),
    "k1-loss-bias_correction": dict(kl_estimator="k1", kl_placement="loss", use_bias_correction_kl=True),
    "k3-loss-bias_correction": dict(kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True),
    "k1-reward-sequence_weight": dict(kl_estimator="k1", kl_placement="reward", kl_importance_weight="sequence"),
    "k1-loss-sequence_weight": dict(kl_estimator="k1", kl_placement="loss", kl_importance_weight="sequence"),
}
KL_METRICS = ("kl/k1", "kl/k2", "kl/k3", "kl/clamp_frac")


@pytest.fixture(scope="module")
def trainer_for(toy_path, tmp_path_factory):
    """Cached float32 trainers by config overrides. Each config is built right before its trainer: building a
    TrainingArguments resets accelerate's shared state, and building a trainer sets it up again."""
    tmp = tmp_path_factory.mktemp("numerics")
    cache = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                args = make_config(tmp, **{"per_device_train_batch_size": ROWS, "num_iterations": 2, **overrides})
                cache[key] = make_trainer(toy_path, args)
        trainer = cache[key]
        trainer.model.zero_grad()
        for values in trainer._metrics["train"].values():
            values.clear()
        return trainer

    return get


def _loss_and_grad(trainer, batch):
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grad


def _metrics(trainer):
    return {k: v[-1] for k, v in trainer._metrics["train"].items() if v}


def _assert_all_finite(trainer, loss, grad):
    assert torch.isfinite(loss), loss
    assert torch.isfinite(grad).all(), f"{(~torch.isfinite(grad)).sum()} non-finite gradient entries"
    bad = {k: v for k, v in _metrics(trainer).items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"


def _extreme_offsets(shape, seed):
    """Log-ratio offsets of exactly -50, 0 or +50 per token (seeded), so both signs and equality occur."""
    gen = torch.Generator().manual_seed(seed)
    return 50.0 * torch.randint(-1, 2, shape, generator=gen).float()


# ---------------------------------------------------------------------------------------------------
# Extreme log-ratios
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_log_ratios_of_50_stay_finite(trainer_for, pair, loss_type):
    """old and ref log-probs at -50, 0 or +50 from the policy's (per token): finite loss, gradient, metrics,
    and kl/clamp_frac > 0 (|log r| = 50 > LOG_RATIO_BOUND)."""
    trainer = trainer_for(loss_type=loss_type, **PAIRS[pair])
    batch, logps = fixed_batch(trainer, rows=ROWS)
    batch["old_per_token_logps"] = logps + _extreme_offsets(logps.shape, 1)
    batch["ref_per_token_logps"] = logps + _extreme_offsets(logps.shape, 2)
    loss, grad = _loss_and_grad(trainer, batch)
    print(f"\n+-50 [{pair}, {loss_type}]: loss {loss.item():.3e}, max|grad| {grad.abs().max().item():.3e}")
    _assert_all_finite(trainer, loss, grad)
    assert grad.abs().sum() > 0
    assert _metrics(trainer)["kl/clamp_frac"] > 0


@pytest.mark.parametrize("pair", list(PAIRS))
def test_any_reference_distance_stays_finite(trainer_for, pair):
    """The reference log-probs enter only trl_kl's code (penalty, KL loss, metrics), where every exponential is
    clamped: ref at +-1e4 from the policy (old at +-5) still gives a finite loss, gradient and metrics. (The
    policy-vs-old log-ratio also feeds TRL's own importance ratio, which TRL exponentiates unclamped: it overflows
    float32 beyond 88.7 nats in stock TRL as well; hence the +-50 above.)"""
    trainer = trainer_for(loss_type="dapo", **PAIRS[pair])
    batch, logps = fixed_batch(trainer, rows=ROWS)
    batch["old_per_token_logps"] = logps + _extreme_offsets(logps.shape, 3) / 10
    batch["ref_per_token_logps"] = logps + _extreme_offsets(logps.shape, 4) * 200
    loss, grad = _loss_and_grad(trainer, batch)
    _assert_all_finite(trainer, loss, grad)
    assert grad.abs().sum() > 0


def test_bias_correction_ratio_keeps_its_gradient_at_log_ratio_30(trainer_for):
    """use_bias_correction_kl: the ratio pi_theta / pi_old multiplies k3 with its gradient. At log-ratio 30 its
    value is clamped to e^20 and its gradient kept: d(rho k3)/dlogp = e^20 (k3 + 1 - r). A clamped exp would give
    e^20 (1 - r): the ratio's own gradient, k3 times it, lost."""
    trainer = trainer_for(**PAIRS["k3-loss-bias_correction"])
    batch, logps = fixed_batch(trainer, rows=ROWS)
    logps = logps.clone().requires_grad_(True)
    old = logps.detach().clone()
    old[0, 0] -= 30.0
    micro = _MicroBatch(inputs={**batch, "old_per_token_logps": old}, logps=logps)
    trainer._kl_loss_term(micro)[0, 0].backward()
    log_r = float(batch["ref_per_token_logps"][0, 0] - logps[0, 0].detach())
    k3 = math.exp(log_r) - 1 - log_r
    assert k3 > 0.01
    expected = math.exp(kl.LOG_RATIO_BOUND) * (k3 + 1 - math.exp(log_r))
    assert float(logps.grad[0, 0]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# kl/clamp_frac: > 0 exactly when a |log ratio| exceeds LOG_RATIO_BOUND
# ---------------------------------------------------------------------------------------------------

B = kl.LOG_RATIO_BOUND
CLAMP_CASES = {
    # name: (old - logps, ref - logps at the chosen token, where, expected number of clamped loss tokens)
    "all_inside": (0.1, B - 0.5, None, 0),
    "current_and_sampling_outside": (0.1, -(B + 1.0), (0, 0), 1),
    "only_sampling_outside": (-5.0, B - 3.0, (1, 1), 1),  # old - ref = -(B + 2): the penalty's log-ratio
    "only_current_outside": (-5.0, -(B + 1.0), (2, 0), 1),  # old - ref = B - 4 inside, logps - ref = B + 1
    "on_a_padded_position": (0.1, B + 5.0, (3, 3), 0),  # row 3 has 2 loss tokens: position 3 is padding
    "on_policy_outside": (None, B + 1.0, (4, 1), 1),  # no old log-probs: sampling = current policy
}


@pytest.mark.parametrize("case", list(CLAMP_CASES))
def test_clamp_frac_counts_exactly_the_log_ratios_beyond_the_bound(trainer_for, case):
    old_offset, ref_offset, where, expected = CLAMP_CASES[case]
    trainer = trainer_for(loss_type="dapo")
    batch, logps = fixed_batch(trainer, rows=ROWS)
    gen = torch.Generator().manual_seed(3)
    ref_default = logps + (B - 1.0) * (2 * torch.rand(logps.shape, generator=gen) - 1)  # |log r| <= B - 1
    batch["ref_per_token_logps"] = ref_default
    batch["old_per_token_logps"] = logps + 0.1
    if old_offset is None:
        del batch["old_per_token_logps"]
    if where is not None:
        batch["ref_per_token_logps"][where] = logps[where] + ref_offset
        if old_offset is not None:
            batch["old_per_token_logps"][where] = logps[where] + old_offset
    mask = batch["completion_mask"].bool()
    assert where is None or mask[where] == (expected == 1)
    trainer._compute_loss(trainer.model, batch)
    clamp_frac = _metrics(trainer)["kl/clamp_frac"]
    # an independent count of |log r| > B over loss tokens, for the sampling and the current policy
    sampling = batch.get("old_per_token_logps", logps)
    beyond = ((sampling - batch["ref_per_token_logps"]).abs() > B) | ((logps - batch["ref_per_token_logps"]).abs() > B)
    assert beyond[mask].sum().item() == expected
    assert clamp_frac == pytest.approx(expected / mask.sum().item(), abs=1e-12)
    assert (clamp_frac > 0) == (expected > 0)


# ---------------------------------------------------------------------------------------------------
# Empty completions
# ---------------------------------------------------------------------------------------------------


def _with_empty_rows(batch, trainer):
    """Row 0: completion mask all zeros; row 1: an immediate eos (TRL's shortest real completion, 1 token)."""
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["completion_mask"][0] = 0
    batch["completion_ids"][1] = trainer.processing_class.pad_token_id
    batch["completion_ids"][1, 0] = trainer.processing_class.eos_token_id
    batch["completion_mask"][1] = 0
    batch["completion_mask"][1, 0] = 1
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    return batch


@pytest.mark.parametrize("pair", ["k1-reward", "k2-loss"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_completion_is_finite_and_contributes_nothing(trainer_for, loss_type, pair):
    """A row with no loss token: finite loss, gradient and metrics; whatever its advantage and old/ref log-probs
    hold (even +-50 offsets), the gradient is bitwise the same: nothing leaks from a masked row."""
    extra = dict(epsilon_high=4.0) if loss_type == "cispo" else {}
    trainer = trainer_for(loss_type=loss_type, **PAIRS[pair], **extra)
    batch, logps = fixed_batch(trainer, rows=ROWS)
    batch = _with_empty_rows(batch, trainer)
    loss, grad = _loss_and_grad(trainer, batch)
    _assert_all_finite(trainer, loss, grad)
    assert grad.abs().sum() > 0

    other = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    other["advantages"][0] = -7.0
    other["old_per_token_logps"][0] = logps[0] + 50.0
    other["ref_per_token_logps"][0] = logps[0] - 50.0
    trainer.model.zero_grad()
    other_loss, other_grad = _loss_and_grad(trainer, other)
    assert torch.equal(other_loss, loss)
    assert torch.equal(other_grad, grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_batch_of_only_empty_completions(trainer_for, loss_type):
    """Every completion empty (e.g. all truncated and masked): loss 0, gradient exactly 0, metrics finite."""
    extra = dict(epsilon_high=4.0) if loss_type == "cispo" else {}
    trainer = trainer_for(loss_type=loss_type, **PAIRS["k2-loss"], **extra)
    batch, _ = fixed_batch(trainer, rows=ROWS)
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    loss, grad = _loss_and_grad(trainer, batch)
    assert loss == 0 and (grad == 0).all()
    metrics = _metrics(trainer)
    assert all(math.isfinite(metrics[k]) for k in (*KL_METRICS, "kl/seq_kl", "is/ratio_mean", "is/ess"))


def test_empty_micro_batch_does_not_poison_the_logged_max(trainer_for):
    """A micro-batch whose completions are all masked, next to a normal one in the same logging window: the
    logged is/ratio_max is the normal micro-batch's (TRL's own clip_ratio/high_max logs NaN and is dropped)."""
    trainer = trainer_for(loss_type="dapo")
    batch, _ = fixed_batch(trainer, rows=ROWS)
    trainer._compute_loss(trainer.model, dict(batch))
    expected = _metrics(trainer)["is/ratio_max"]
    empty = {**batch, "completion_mask": torch.zeros_like(batch["completion_mask"])}
    empty["num_items_in_batch"] = empty["completion_mask"].sum()
    trainer._compute_loss(trainer.model, empty)
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["clip_ratio/high_max"] is not None and math.isfinite(logged["clip_ratio/high_max"])  # TRL's
    assert logged["is/ratio_max"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# Equal and unscorable rewards: advantage exactly 0
# ---------------------------------------------------------------------------------------------------

NAN = float("nan")
GROUP = 8  # num_generations for these tests: 8 copies of 0.3 have a float32 mean 3e-8 away from 0.3
# groups of 8: equal rewards (0.3), all unscorable (NaN), a single scorable reward, then a normal group
REWARDS = [0.3] * GROUP + [NAN] * GROUP + [NAN] * (GROUP - 1) + [1.0] + [0.0, 1.0, 0.0, 1.0, 0.6, 0.2, 0.9, 0.4]
ZERO_ROWS, NORMAL_ROWS = slice(0, 3 * GROUP), slice(3 * GROUP, 4 * GROUP)


@pytest.mark.parametrize("bounds", [{}, {"clip_std_min": 0.1}, {"clip_std_min": 1e-8}, {"clip_std_max": 0.25}])
def test_equal_and_nan_rewards_give_zero_advantage(trainer_for, bounds):
    """Through ``group_normalized_advantages`` and the trainer's ``_advantages``: a group of equal rewards, of NaN
    rewards, or with a single scorable reward gets advantage exactly 0 (not rounding noise / a tiny std, which
    clip_std_min=1e-8 or clip_std_max alone would amplify to ~0.94); a normal group does not."""
    rewards = torch.tensor(REWARDS)
    pure = group_normalized_advantages(
        rewards, GROUP, "group", bounds.get("clip_std_min"), bounds.get("clip_std_max")
    )
    trainer = trainer_for(num_generations=GROUP, **bounds)
    output = {"completion_ids": torch.zeros(len(REWARDS), 3, dtype=torch.long)}
    through_trainer = trainer._advantages(output, rewards)
    for advantages in (pure, through_trainer):
        assert torch.isfinite(advantages).all()
        assert (advantages[ZERO_ROWS] == 0).all(), advantages
        assert (advantages[NORMAL_ROWS] != 0).all()
    assert torch.equal(pure, through_trainer)


def test_nan_rewards_stay_zero_with_the_sequence_scope(trainer_for):
    """kl_reward_scope='sequence' adds the summed KL penalty to the normalised advantage per token, in the loss, like
    every scope (docs/theory.md#sequence-kl): the rollout's advantages are the rewards' alone, so an unscorable (NaN)
    reward and a group of equal rewards get exactly 0 there, whatever the completions' penalties (the loss then adds
    -beta * their sequence KL, tests/test_grpo.py)."""
    trainer = trainer_for(kl_reward_scope="sequence", clip_std_min=0.05, num_generations=GROUP)
    rows = len(REWARDS)
    ref = torch.full((rows, 3), -1.0)
    old = ref + 0.2
    old[NORMAL_ROWS.start, 0] += 0.5  # the normal group's first completion drifted more from the reference
    output = {"completion_ids": torch.zeros(rows, 3, dtype=torch.long), "completion_mask": torch.ones(rows, 3),
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    advantages = trainer._advantages(output, torch.tensor(REWARDS))
    assert torch.equal(advantages, group_normalized_advantages(torch.tensor(REWARDS), GROUP, "group", 0.05))
    assert (advantages[ZERO_ROWS] == 0).all(), advantages
    assert (trainer._advantages(output, torch.full((rows,), 0.3)) == 0).all()  # equal rewards: the KL is not here


def test_unscorable_rollout_end_to_end(toy_path, tmp_path):
    """A real rollout whose reward function returns None (unscorable) for one prompt and a constant for the other:
    every advantage is exactly 0, and the loss on that rollout is finite with a finite gradient."""

    def reward(completions, prompts, **kwargs):
        return [None if p.startswith("12") else 1.0 for p in prompts]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = make_config(tmp_path, clip_std_min=0.1, num_iterations=2)
        trainer = GRPOTrainer(model=toy_path, reward_funcs=[reward], args=args, train_dataset=make_dataset(8, 0))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = [{"prompt": p, "answer": a} for p, a in zip(["12+34="] * 2 + ["7+8="] * 2, ["46"] * 2 + ["15"] * 2)]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = trainer._generate_and_score_completions(inputs)
    assert (output["advantages"] == 0).all(), output["advantages"]
    loss, grad = _loss_and_grad(trainer, output)
    _assert_all_finite(trainer, loss, grad)


# ---------------------------------------------------------------------------------------------------
# A policy with probability ~1 on its token (logps ~ 0) against a reference at -50
# ---------------------------------------------------------------------------------------------------


def test_single_token_distribution_pure_functions():
    """Logits with one dominant token: log pi ~ 0 on it; a reference giving it log-prob -50. Every estimator,
    penalty, loss and the exact vocabulary KL are finite with finite gradients, and the exact KL ~ k1 ~ 50."""
    vocab = 17
    logits = torch.zeros(2, 3, vocab)
    logits[..., 5] = 60.0  # p(5) = 1 - 16 e^-60
    logits.requires_grad_(True)
    ref_logits = torch.zeros(2, 3, vocab)
    ref_logits[..., 5] = -50.0 + math.log(vocab - 1)  # ref p(5) ~ e^-50
    ref = torch.log_softmax(ref_logits, -1)[..., 5]
    logps = torch.log_softmax(logits, -1)[..., 5]
    assert logps.detach().abs().max() < 1e-6 and torch.allclose(ref, torch.full_like(ref, -50.0), atol=1e-4)
    for estimator in ("k1", "k2", "k3", "k3_clip"):
        for with_ratio in (False, True):
            logps = torch.log_softmax(logits, -1)[..., 5]
            ratio = torch.exp((logps - logps.detach()).clamp(-B, B)) if with_ratio else None  # bias correction
            out = kl.kl_loss(estimator, logps, ref, importance_ratio=ratio)
            assert torch.isfinite(out).all(), (estimator, out)
            (grad,) = torch.autograd.grad(out.sum(), logits)
            assert torch.isfinite(grad).all(), estimator
    for estimator in ("k1", "k2", "k3", "k3_clip"):
        assert torch.isfinite(kl.reward_penalty(estimator, logps.detach(), ref)).all()
    exact = kl.full_kl(logits, ref_logits)
    (grad,) = torch.autograd.grad(exact.sum(), logits)
    assert torch.isfinite(exact).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(exact, kl.k1(logps, ref).detach(), rtol=1e-4, atol=0)
    assert kl.k1(logps, ref).min() > 49.99


@pytest.fixture(scope="module")
def sharp_batch(trainer_for):
    """A batch on which the toy policy, made ~deterministic (final norm x 1000: logits x 1000), puts probability ~1
    on every completion token (greedy completions of 3 tokens), with ref log-probs at -50."""
    trainer = trainer_for(loss_type="dapo")
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.model.norm.weight.mul_(1000.0)
        batch, _ = fixed_batch(trainer, rows=4)
        ids, attention = batch["prompt_ids"], batch["prompt_mask"]
        for _ in range(3):
            logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
    completion_ids = ids[:, batch["prompt_ids"].size(1):]
    mask = torch.ones_like(completion_ids)
    sharp = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(state)
    out = dict(prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"], completion_ids=completion_ids,
               completion_mask=mask, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), num_items_in_batch=mask.sum())
    return out, sharp


@pytest.mark.parametrize("pair", list(PAIRS))
def test_single_token_policy_against_distant_reference(trainer_for, sharp_batch, pair):
    batch, sharp = sharp_batch
    trainer = trainer_for(loss_type="dapo", **PAIRS[pair])
    original = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(sharp)
    try:
        with torch.no_grad():
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
            logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, 3)[0]
        assert logps.abs().max() < 1e-3, logps  # probability ~1 on each completion token
        batch = {**batch, "old_per_token_logps": logps.clone(), "ref_per_token_logps": logps - 50.0}
        loss, grad = _loss_and_grad(trainer, batch)
        _assert_all_finite(trainer, loss, grad)
        metrics = _metrics(trainer)
        assert metrics["kl/clamp_frac"] == 1.0 and metrics["kl/k1"] == pytest.approx(50.0, rel=1e-5)
    finally:
        trainer.model.load_state_dict(original)


# ---------------------------------------------------------------------------------------------------
# float32 KL arithmetic under bf16
# ---------------------------------------------------------------------------------------------------


def test_kl_functions_float32_under_autocast():
    """Under ``torch.autocast("cpu", bfloat16)`` the KL functions return float32, bit-equal to their values
    without autocast; given bf16 log-probs they return float32 equal to upcasting first (tests/test_kl.py has
    the per-estimator bf16 checks)."""
    gen = torch.Generator().manual_seed(0)
    logps = -3 * torch.rand(4, 6, generator=gen)
    ref = logps + torch.randn(4, 6, generator=gen)
    old = logps + 0.3 * torch.randn(4, 6, generator=gen)
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    ratio = torch.exp(logps - old)

    def compute(lp, rf, od):
        out = {}
        for name in ("k1", "k2", "k3", "k3_clip"):
            out[name] = kl.estimate(name, lp, rf)
            out[f"{name}-loss"] = kl.kl_loss(name, lp, rf, importance_ratio=ratio)
        for name in ("k1", "k2", "k3", "k3_clip"):
            out[f"{name}-penalty"] = kl.reward_penalty(name, od, rf)
        penalty = kl.reward_penalty("k1", od, rf)
        for scope in kl.REWARD_SCOPES:
            out[f"shaped-{scope}"] = kl.kl_shaped_advantages(torch.ones(4), penalty, mask, 0.1, scope)
        out["seq"] = kl.sequence_sum(kl.k1(lp, rf), mask)
        return out

    plain = compute(logps, ref, old)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = compute(logps, ref, old)
    from_bf16 = compute(logps.bfloat16(), ref.bfloat16(), old.bfloat16())
    upcast = compute(logps.bfloat16().float(), ref.bfloat16().float(), old.bfloat16().float())
    for name in plain:
        assert autocast[name].dtype == torch.float32 and from_bf16[name].dtype == torch.float32, name
        assert torch.equal(autocast[name], plain[name]), name
        assert torch.equal(from_bf16[name], upcast[name]), name


def test_trainer_kl_is_float32_under_autocast_with_bf16_log_probs(trainer_for, monkeypatch):
    """The trainer's loss under bf16 autocast, with old/ref log-probs stored in bf16: every kl.* function the
    trainer calls returns float32 (the spy also checks that bf16 really reached them), loss and gradient finite."""
    seen = []
    for name in ("reward_penalty", "kl_loss", "k1", "k2", "k3", "log_ratio", "sequence_sum", "kl_shaped_advantages"):
        original = getattr(kl, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            seen.append((_name, [a.dtype for a in args if torch.is_tensor(a)], out.dtype))
            return out

        monkeypatch.setattr(kl, name, spy)
    for pair in ("k1-reward", "k3-loss-bias_correction", "k2-loss"):
        seen.clear()
        trainer = trainer_for(loss_type="dapo", **PAIRS[pair])
        batch, _ = fixed_batch(trainer, rows=ROWS)
        batch["old_per_token_logps"] = batch["old_per_token_logps"].bfloat16()
        batch["ref_per_token_logps"] = batch["ref_per_token_logps"].bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grad = _loss_and_grad(trainer, batch)
        _assert_all_finite(trainer, loss, grad)
        assert any(torch.bfloat16 in dtypes for _, dtypes, _ in seen), seen
        wrong = [(name, out) for name, _, out in seen if out != torch.float32]
        assert not wrong, f"{pair}: KL computed in {wrong}"
        assert {"reward_penalty" if "reward" in pair else "kl_loss", "k1", "k2", "k3"} <= {n for n, _, _ in seen}


# ---------------------------------------------------------------------------------------------------
# Metrics: kl/k1, kl/k2, kl/k3, kl/clamp_frac whatever the estimator, from the one policy forward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", list(PAIRS))
def test_kl_metrics_logged_for_every_estimator_without_extra_forward(trainer_for, pair):
    trainer = trainer_for(loss_type="dapo", **PAIRS[pair])
    calls = {"policy": 0, "ref": 0}
    handles = [trainer.model.register_forward_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1))]
    if trainer.ref_model is not None:
        handles.append(trainer.ref_model.register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1)))
    try:
        batch, logps = fixed_batch(trainer, rows=ROWS)
        calls.update(policy=0, ref=0)
        trainer._compute_loss(trainer.model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"policy": 1, "ref": 0}
    metrics = _metrics(trainer)
    mask = batch["completion_mask"].bool()
    log_r = (batch["ref_per_token_logps"] - logps)[mask].double()
    expected = {"kl/k1": -log_r.mean(), "kl/k2": (0.5 * log_r**2).mean(), "kl/k3": (torch.expm1(log_r) - log_r).mean(),
                "kl/clamp_frac": 0.0}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-7), key

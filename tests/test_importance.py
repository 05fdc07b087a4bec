"""trl_kl.importance: TRL 1.16's importance ratios and sampler corrections, pinned against TRL's own code, and
the exact sequence weights (docs/theory.md#sampler-mismatch).

The unit tests compare with values written out by hand; the pins run stock ``trl.GRPOTrainer`` on the toy
policy (``_generate_and_score_completions`` through a vLLM test double, ``_compute_loss`` on a fixed batch)
and compare its tensors with these functions.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import trl

from trl_kl import importance, kl

from grpo_batch import fixed_batch, make_config, make_trainer
from vllm_double import FakeVLLMGeneration, attach


def t64(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------

LOGPS = t64([-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0])
OLD = t64([-1.5, -1.0, -0.5], [-0.2, -2.0, -9.0])
MASK = t64([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])  # the last token of row 2 is padding


def test_policy_ratio_token_and_sequence():
    lp = LOGPS.clone().requires_grad_(True)
    token = importance.policy_ratio(lp, OLD, MASK, "token")
    torch.testing.assert_close(token, torch.exp(LOGPS - OLD), rtol=0, atol=0)
    seq = importance.policy_ratio(lp, OLD, MASK, "sequence")  # GSPO: exp of the masked *mean* log-ratio
    torch.testing.assert_close(seq, t64([math.exp((0.5 - 1.0 + 0.0) / 3)], [math.exp((0.0 - 1.0) / 2)]),
                               rtol=1e-15, atol=0)
    seq.sum().backward()  # d/dlogp_t = ratio / |y| on the mask, 0 off it
    torch.testing.assert_close(lp.grad, t64([seq[0, 0].item() / 3] * 3, [seq[1, 0].item() / 2] * 2 + [0.0]),
                               rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance.policy_ratio(LOGPS, OLD, MASK, "sequence_product")


def test_sampler_correction_modes():
    old, sampling = t64([-1.0, -1.0], [-2.0, -0.5]), t64([-2.0, -0.5], [-2.0, float("nan")])
    mask = t64([1.0, 1.0], [1.0, 1.0])
    # token ratios: e^1, e^-0.5 | 1, 1 (NaN: no correction); sequence ratios: e^0.5 | 1
    tok = importance.sampler_correction(old, sampling, mask, "token_truncate", None, 2.0)
    torch.testing.assert_close(tok, t64([2.0, math.exp(-0.5)], [1.0, 1.0]), rtol=1e-15, atol=0)
    tok = importance.sampler_correction(old, sampling, mask, "token_mask", 0.7, 2.0)
    torch.testing.assert_close(tok, t64([0.0, 0.0], [1.0, 1.0]), rtol=0, atol=0)  # e^1 > 2 and e^-0.5 < 0.7
    seq = importance.sampler_correction(old, sampling, mask, "sequence_truncate", 1.2, None)
    torch.testing.assert_close(seq, t64([math.exp(0.5)], [1.2]), rtol=1e-15, atol=0)
    seq = importance.sampler_correction(old, sampling, mask, "sequence_mask", None, 1.5)
    torch.testing.assert_close(seq, t64([0.0], [1.0]), rtol=0, atol=0)
    nobound = importance.sampler_correction(old, sampling, mask, "sequence_mask", None, None)
    torch.testing.assert_close(nobound, t64([math.exp(0.5)], [1.0]), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="clip_min or clip_max"):
        importance.sampler_correction(old, sampling, mask, "token_truncate", None, None)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        importance.sampler_correction(old, sampling, mask, "sequence", None, 3.0)


def test_clipped_surrogate_loss():
    ratio = t64([0.5, 1.1, 1.5])
    pos = importance.clipped_surrogate_loss(ratio, torch.tensor(2.0, dtype=torch.float64), 0.2, 0.2)
    torch.testing.assert_close(pos, t64([-1.0, -2.2, -2.4]), rtol=1e-15, atol=0)  # -min(rA, clip(r)A)
    neg = importance.clipped_surrogate_loss(ratio, torch.tensor(-2.0, dtype=torch.float64), 0.2, 0.2)
    torch.testing.assert_close(neg, t64([1.6, 2.2, 3.0]), rtol=1e-15, atol=0)
    capped = importance.clipped_surrogate_loss(ratio, torch.tensor(-2.0, dtype=torch.float64), 0.2, 0.2, delta=1.3)
    torch.testing.assert_close(capped, t64([1.6, 2.2, 2.6]), rtol=1e-15, atol=0)


def test_sequence_weight_value_and_gradient():
    lp = LOGPS.clone().requires_grad_(True)
    w = importance.sequence_weight(lp, OLD, MASK)
    expected = t64([math.exp(-0.5)], [math.exp(-1.0)])  # exp of the masked *sum*: the likelihood ratio
    torch.testing.assert_close(w, expected, rtol=1e-15, atol=0)
    w.sum().backward()  # grad W = W grad log W: W on each masked token
    torch.testing.assert_close(lp.grad, expected * MASK, rtol=1e-15, atol=0)
    # beyond the exponent clamp the value stops at e^20 and the gradient keeps the clamped weight's
    far = torch.tensor([[30.0]], dtype=torch.float64, requires_grad=True)
    wf = importance.sequence_weight(far, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1))
    wf.sum().backward()
    assert float(wf.detach()) == pytest.approx(math.exp(kl.LOG_RATIO_BOUND), rel=1e-15)
    assert float(far.grad) == pytest.approx(math.exp(kl.LOG_RATIO_BOUND), rel=1e-15)


def test_sequence_weight_per_token_has_its_own_token_gradient():
    lp = LOGPS.clone().requires_grad_(True)
    w = importance.sequence_weight_per_token(lp, OLD, MASK)
    expected = t64([math.exp(-0.5)] * 3, [math.exp(-1.0)] * 2 + [0.0])
    torch.testing.assert_close(w, expected, rtol=1e-15, atol=0)
    (w * t64([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])).sum().backward()  # token t: W * a_t grad log pi_t only
    torch.testing.assert_close(lp.grad, expected * t64([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), rtol=1e-15, atol=0)


def test_token_ratio_keeps_its_gradient_beyond_the_clamp():
    """use_bias_correction_kl's ratio at log-ratio 30: the value stops at e^20, the gradient is the clamped
    ratio times grad log pi (not the 0 of a clamped exp's literal derivative); inside the bound it is exp."""
    lp = torch.tensor([[30.0, -30.0, 0.5]], dtype=torch.float64, requires_grad=True)
    ratio = importance.token_ratio(lp, torch.zeros(1, 3, dtype=torch.float64))
    bound = math.exp(kl.LOG_RATIO_BOUND)
    torch.testing.assert_close(ratio.detach(), t64([bound, 1 / bound, math.exp(0.5)]), rtol=1e-15, atol=0)
    ratio.sum().backward()
    torch.testing.assert_close(lp.grad, t64([bound, 1 / bound, math.exp(0.5)]), rtol=1e-15, atol=0)


def test_sequence_weighted_penalty_by_hand():
    """W_b = exp(sum_t mask (logps - q)) on every token times the return-to-go penalty; token t's gradient is
    W_b * carried_t (its own token only)."""
    lp = LOGPS.clone().requires_grad_(True)
    penalty = t64([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    out = importance.sequence_weighted_penalty(penalty, lp, OLD, MASK, "return_to_go")
    w = t64([math.exp(-0.5)], [math.exp(-1.0)])
    carried = t64([6.0, 5.0, 3.0], [9.0, 5.0, 0.0])
    torch.testing.assert_close(out, w * carried, rtol=1e-15, atol=0)
    out.sum().backward()
    torch.testing.assert_close(lp.grad, w * carried, rtol=1e-15, atol=0)


def test_sequence_weighted_kl_loss_gradient_only_for_unbiased_values():
    """k1/k3: d(W sum_t k_t)/dlogp_t = W (sum_s k_s + dk_t); k2/k3_clip/full: W detached, W dk_t."""
    k = t64([0.5, -1.0, 2.0], [1.0, 3.0, 7.0])
    w = t64([math.exp(-0.5)], [math.exp(-1.0)])
    for estimator, with_gradient in (("k1", True), ("k3", True), ("k2", False), ("k3_clip", False), ("full", False)):
        lp = LOGPS.clone().requires_grad_(True)
        per_token = k * (1 + lp - lp.detach())  # value k, gradient k per token
        out = importance.sequence_weighted_kl_loss(estimator, per_token, lp, OLD, MASK)
        torch.testing.assert_close(out, w * k, rtol=1e-15, atol=0)
        (out * MASK).sum().backward()
        summed = (k * MASK).sum(-1, keepdim=True) if with_gradient else 0.0
        torch.testing.assert_close(lp.grad, w * (summed + k) * MASK, rtol=1e-14, atol=0)


def test_prefix_weights():
    w = importance.prefix_weights(LOGPS, OLD, MASK)
    torch.testing.assert_close(w, t64([math.exp(0.5), math.exp(-0.5), math.exp(-0.5)], [1.0, math.exp(-1.0), 0.0]),
                               rtol=1e-15, atol=0)
    assert not w.requires_grad


# ---------------------------------------------------------------------------------------------------
# Pinned against TRL 1.16's own code
# ---------------------------------------------------------------------------------------------------

PROMPTS = [("12+34=", "46"), ("12+34=", "46"), ("7+8=", "15"), ("7+8=", "15")]


@pytest.fixture(scope="module")
def stock(toy_path, tmp_path_factory):
    args = make_config(tmp_path_factory.mktemp("stock"), cls=trl.GRPOConfig, beta=0.0, max_completion_length=3)
    return make_trainer(toy_path, args, cls=trl.GRPOTrainer)


def _vllm_rollout(trainer, mode, clip_min, clip_max):
    """One rollout of stock TRL through the vLLM double: completions "46<eos>", "4", "15<eos>", "1" with
    sampling log-probs far from the model's (one NaN: a token vLLM could not score)."""
    tok = trainer.processing_class
    eos = tok.eos_token_id
    completions = [tok("46").input_ids + [eos], tok("4").input_ids, tok("15").input_ids + [eos], tok("1").input_ids]
    gen = torch.Generator().manual_seed(0)
    logprobs = [(-3 * torch.rand(len(c), generator=gen)).tolist() for c in completions]
    logprobs[2][1] = None
    attach(trainer, FakeVLLMGeneration(completions, logprobs), mode, clip_min, clip_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer._generate_and_score_completions([{"prompt": p, "answer": a} for p, a in PROMPTS])


@pytest.mark.parametrize(
    "mode,clip_min,clip_max",
    [("token_truncate", None, 3.0), ("token_mask", 0.5, 3.0), ("sequence_truncate", 0.2, 3.0),
     ("sequence_mask", None, 3.0), ("sequence_mask", None, None)],
)
def test_sampler_correction_is_trls(stock, mode, clip_min, clip_max):
    out = _vllm_rollout(stock, mode, clip_min, clip_max)
    mask = out["completion_mask"]
    sampling = out["sampling_per_token_logps"]
    assert torch.isnan(sampling).any()  # the unscored token reaches the correction
    ours = importance.sampler_correction(out["old_per_token_logps"], sampling, mask, mode, clip_min, clip_max)
    torch.testing.assert_close(ours, out["importance_sampling_ratio"], rtol=0, atol=0)
    # not trivially 1: the double's log-probs differ from the model's
    assert float((ours - 1).abs().max()) > 0.1


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_ratio_and_surrogate_are_trls_loss(toy_path, tmp_path, level):
    """Stock TRL's _compute_loss (dr_grpo, vLLM correction on, epsilon 0.2, delta 1.5) equals
    sum(clipped_surrogate_loss(policy_ratio(...)) * correction * mask) / (B * max_completion_length): value and
    gradient."""
    args = make_config(tmp_path, cls=trl.GRPOConfig, beta=0.0, loss_type="dr_grpo", importance_sampling_level=level,
                       delta=1.5)
    trainer = make_trainer(toy_path, args, cls=trl.GRPOTrainer)
    attach(trainer, FakeVLLMGeneration([], []))
    batch, _ = fixed_batch(trainer)
    gen = torch.Generator().manual_seed(1)
    batch["importance_sampling_ratio"] = 0.5 + torch.rand(batch["completion_ids"].shape, generator=gen)
    trainer.model.zero_grad()
    theirs = trainer._compute_loss(trainer.model, dict(batch))
    theirs.backward()
    theirs_grad = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, input_ids.size(1) -
                                                       batch["prompt_ids"].size(1))[0]
    mask = batch["completion_mask"]
    ratio = importance.policy_ratio(logps, batch["old_per_token_logps"], mask, level)
    per_token = importance.clipped_surrogate_loss(ratio, batch["advantages"].unsqueeze(1), 0.2, 0.2, delta=1.5)
    ours = (per_token * batch["importance_sampling_ratio"] * mask).sum() / (mask.size(0) * args.max_completion_length)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for a, b in zip(theirs_grad, (p.grad for p in trainer.model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trls_own_kl_term_gets_no_sampler_correction(toy_path, tmp_path):
    """TRL 1.16 multiplies the policy loss by the vLLM correction (grpo_trainer.py line 3147) and adds its KL
    term after (line 3150): beta * k3 * coef_1, with coef_1 = pi_theta / pi_old (old_per_token_logps), never
    the engine's sampling log-probs. Pinned: the loss difference between beta = 0.1 and 0 is exactly that."""
    losses = {}
    for beta in (0.0, 0.1):
        args = make_config(tmp_path, cls=trl.GRPOConfig, beta=beta, loss_type="dr_grpo")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = make_trainer(toy_path, args, cls=trl.GRPOTrainer)
        attach(trainer, FakeVLLMGeneration([], []))
        batch, logps = fixed_batch(trainer)
        batch["importance_sampling_ratio"] = torch.full(batch["completion_ids"].shape, 0.25)
        batch["sampling_per_token_logps"] = batch["old_per_token_logps"] - 1.0  # an engine far from pi_old
        losses[beta] = trainer._compute_loss(trainer.model, dict(batch)).detach()
    mask = batch["completion_mask"]
    k3_term = kl.k3(logps, batch["ref_per_token_logps"]) * importance.policy_ratio(logps, batch["old_per_token_logps"],
                                                                                  mask)
    expected = 0.1 * (k3_term * mask).sum() / (mask.size(0) * 4)
    torch.testing.assert_close(losses[0.1] - losses[0.0], expected, rtol=1e-4, atol=1e-7)

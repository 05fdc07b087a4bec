"""trl_kl.GRPOTrainer's vLLM code path without vLLM (docs/theory.md#sampler-mismatch), through the test double of
TRL's generation object (``vllm_double``): the engine returns completions with log-probs deliberately far from the
trainer's model (uniform in [-3, 0], one token it could not score), so q != pi_old; the policy is then moved away
from its rollout-time copy (a stale step), so pi_theta != pi_old too.

* (a) the reward penalty comes from the trainer's log-probs: pi_old's with ``kl_importance_weight="token"``, the
  current policy's with ``"sequence"``, never the engine's;
* (b) TRL's sampler correction multiplies the KL-shaped advantages, (c) and the loss placement's KL term;
* (d) every sampler-correction mode x ``importance_sampling_level`` x ``kl_reward_scope`` x ``kl_importance_weight``
  the config accepts gives the loss (value and gradient) of the harness form ``exact_gradients.trainer_form``
  names, computed by ``exact_gradients.per_sample_loss`` on the same tensors: the rows of docs/kl_gradient_bias.md
  are the trainer's code path;
* (e) the metrics show the mismatch (TRL's ``sampling/*``, and ``is/ess``, ``is/seq_weight_*`` with the engine's
  part).

One toy trainer serves every case (its KL settings and TRL's vLLM attributes are switched per case); each case is
one micro-batch forward and backward. ~15 s on the 2 shared cores.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from grpo_batch import make_config, make_trainer
from trl_kl import _trl, kl
from trl_kl import exact_gradients as eg
from trl_kl.advantages import effective_sample_size
from vllm_double import FakeVLLMGeneration, attach

BETA, EPSILON, MAX_LEN = 0.1, 0.2, 4
PROMPTS = [("12+34=", "46"), ("12+34=", "46"), ("7+8=", "15"), ("7+8=", "15")]
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ROLLOUTS = [(mode, 3.0) for mode in MODES] + [("sequence_mask", None), (None, None)]
"""The vLLM settings of the rollouts: each correction mode at TRL's default cap, TRL's default mode uncapped (the
exact correction), and the correction off (mode None)."""


@dataclasses.dataclass
class Setup:
    trainer: object
    rollouts: dict
    """(mode, cap) -> the rollout dict TRL built through the double, with pi_old = the unperturbed policy."""


@pytest.fixture(scope="module")
def setup(toy_path, tmp_path_factory):
    args = make_config(tmp_path_factory.mktemp("vllm"), beta=BETA, loss_type="dr_grpo", epsilon=EPSILON,
                       max_completion_length=MAX_LEN)
    trainer = make_trainer(toy_path, args)
    with torch.no_grad():  # the reference starts as a copy of the policy: move it, so the KL is not 0
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tok = trainer.processing_class
    eos = tok.eos_token_id
    completions = [tok("46").input_ids + [eos], tok("4").input_ids, tok("15").input_ids + [eos], tok("1").input_ids]
    gen = torch.Generator().manual_seed(0)
    logprobs = [(-3 * torch.rand(len(c), generator=gen)).tolist() for c in completions]
    logprobs[2][1] = None  # a token the engine could not score: TRL gives it a NaN log-prob
    rollouts = {}
    for mode, cap in ROLLOUTS:
        _switch(trainer, FakeVLLMGeneration(completions, logprobs), mode, cap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rollouts[mode, cap] = trainer._generate_and_score_completions([{"prompt": p, "answer": a} for p, a in PROMPTS])
    with torch.no_grad():  # a stale step: pi_theta moves away from the rollout's pi_old
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return Setup(trainer, rollouts)


def _switch(trainer, fake, mode, cap):
    """TRL's vLLM attributes for a correction ``mode`` (None: correction off) with upper bound ``cap``."""
    attach(trainer, fake, mode or "sequence_mask", None, cap, correction=mode is not None)


def _configure(setup: Setup, config: eg.TrainerConfig, mode, cap) -> dict:
    """Switch the trainer to ``config`` (its KL settings, TRL's importance level) on the rollout of (mode, cap);
    return a copy of that rollout with zero advantages (the loss is then the KL part alone)."""
    trainer = setup.trainer
    trainer.kl_settings = dataclasses.replace(
        trainer.kl_settings, estimator=config.kl_estimator, placement=config.kl_placement,
        reward_scope=config.kl_reward_scope, importance_weight=config.kl_importance_weight,
        bias_correction=config.use_bias_correction_kl,
    )
    trainer.importance_sampling_level = config.importance_sampling_level
    _switch(trainer, trainer.vllm_generation, mode, cap)
    batch = dict(setup.rollouts[mode, cap])
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    for values in _trl.metrics(trainer, "train").values():
        values.clear()
    return batch


def _trainer_loss(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), _grad(trainer)


def _grad(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def _forward(trainer, batch, model=None):
    """Per-token log-probs of the completions under ``model`` (default: the policy, with gradient) and its
    logits at the completion-predicting positions ``(B*T, V)`` (TRL's temperature applied)."""
    model = model or trainer.model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    T = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return logps, logits.reshape(-1, logits.size(-1))


def _harness_loss(trainer, batch, form: eg.Form):
    """beta * sum over the batch of ``eg.per_sample_loss`` (the harness's per-sample loss of ``form``), with
    dr_grpo's normaliser (B * max_completion_length), on this batch's tensors; its gradient in the policy."""
    trainer.model.zero_grad()
    logps, logits = _forward(trainer, batch)
    with torch.no_grad():
        _, ref_logits = _forward(trainer, batch, trainer.ref_model)
    B, T = logps.shape
    old = batch.get("old_per_token_logps", logps.detach())
    rollout = eg.Rollout(
        logp=logps, old=old, sampling=batch.get("sampling_per_token_logps", old), ref=batch["ref_per_token_logps"],
        mask=batch["completion_mask"].float(), q=None, states=torch.arange(B * T).view(B, T), tokens=None,
        reward=None, missing=0.0, logits=logits, ref_logits=ref_logits,
    )
    loss = BETA * eg.per_sample_loss(rollout, form).sum() / (B * MAX_LEN)
    loss.backward()
    return loss.detach(), _grad(trainer)


def _cases():
    """(config, mode, cap): the trainer table's configurations on every rollout, and every correction mode x
    importance level x reward scope x kl_importance_weight the config accepts, at TRL's default cap."""
    cases = [(c, mode, cap) for c in eg.TRAINER_CONFIGS for mode, cap in (("sequence_mask", 3.0), (None, None))]
    for weight in ("token", "sequence"):
        for mode in MODES:
            for level in ("token", "sequence"):
                for scope in kl.REWARD_SCOPES:
                    if not refused(weight, level, scope):
                        config = eg.TrainerConfig(weight, kl_reward_scope=scope, importance_sampling_level=level)
                        cases.append((config, mode, 3.0))
    cases.append((eg.TrainerConfig(), "sequence_mask", None))
    cases.append((eg.TrainerConfig(kl_estimator="k2", kl_placement="loss"), "token_truncate", 3.0))
    return cases


def refused(weight, level, scope) -> bool:
    """What GRPOConfig refuses (test_gspo_with_per_token_kl_is_refused): GSPO's ratio on a per-token KL."""
    return weight == "token" and level == "sequence" and scope != "sequence"


def _case_id(case):
    config, mode, cap = case
    return f"{config.label}|{mode}<={cap}"


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_trainer_loss_is_the_harness_form(setup, case):
    """The trainer's loss on a stale, engine-sampled micro-batch equals, value and gradient, the harness's loss of
    ``trainer_form(config)`` on the same tensors (with zero advantages: the KL part alone)."""
    config, mode, cap = case
    config = dataclasses.replace(config, use_vllm=True, vllm_importance_sampling_correction=mode is not None,
                                 vllm_importance_sampling_mode=mode or "sequence_mask",
                                 vllm_importance_sampling_clip_max=cap)
    batch = _configure(setup, config, mode, cap)
    loss, grad = _trainer_loss(setup.trainer, batch)
    expected, expected_grad = _harness_loss(setup.trainer, batch, eg.trainer_form(config))
    assert float(expected.abs()) > 1e-4 and float(expected_grad.abs().max()) > 1e-5  # not a vacuous 0 = 0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6)


def test_the_cases_are_off_policy_and_the_engine_differs(setup):
    batch = setup.rollouts["sequence_mask", 3.0]
    mask = batch["completion_mask"].bool()
    logps, _ = _forward(setup.trainer, batch)
    engine = batch["sampling_per_token_logps"]
    assert torch.isnan(engine[mask]).sum() == 1  # the unscored token reaches the trainer
    assert float((logps.detach() - batch["old_per_token_logps"])[mask].abs().max()) > 0.01  # stale
    assert float(torch.nan_to_num(engine - batch["old_per_token_logps"])[mask].abs().max()) > 0.5  # engine != pi_old
    corr = batch["importance_sampling_ratio"]
    assert float(corr.min()) == 0.0 and float(corr.max()) > 0  # TRL's cap masks one sequence here, keeps others


# ---------------------------------------------------------------------------------------------------
# (a) the penalty's policy, (b) and (c) TRL's correction, by hand
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["token", "sequence"])
def test_reward_penalty_is_the_trainers_never_the_engines(setup, weight):
    batch = _configure(setup, eg.TrainerConfig(weight), "sequence_mask", 3.0)
    setup.trainer._compute_loss(setup.trainer.model, dict(batch))
    logged = _trl.metrics(setup.trainer, "train")["kl/reward_penalty"][-1]
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        current, _ = _forward(setup.trainer, batch)

    def mean_penalty(logps):
        return float((logps - batch["ref_per_token_logps"])[mask].mean())

    expected = mean_penalty(batch["old_per_token_logps"] if weight == "token" else current)
    assert logged == pytest.approx(expected, rel=1e-5)
    others = [mean_penalty(torch.nan_to_num(batch["sampling_per_token_logps"])),
              mean_penalty(current if weight == "token" else batch["old_per_token_logps"])]
    assert all(abs(logged - other) > 1e-3 for other in others)


def _on_policy(setup, config, mode, cap):
    """The batch with pi_old = the current policy (the first optimizer step on a rollout): ratio 1, clip inactive."""
    batch = _configure(setup, config, mode, cap)
    with torch.no_grad():
        batch["old_per_token_logps"] = _forward(setup.trainer, batch)[0]
    return batch


@pytest.mark.parametrize("mode", MODES)
def test_sampler_correction_multiplies_the_kl_shaped_advantages(setup, mode):
    """(b) kl_importance_weight="token", first step on the rollout: the loss is beta * sum_i,t corr * R_it /
    (B * L), R the return-to-go penalty of pi_old and corr TRL's correction (per token or per sequence)."""
    batch = _on_policy(setup, eg.TrainerConfig(), mode, 3.0)
    loss, _ = _trainer_loss(setup.trainer, batch)
    mask = batch["completion_mask"].float()
    penalty = (batch["old_per_token_logps"] - batch["ref_per_token_logps"]) * mask
    carried = penalty.flip(-1).cumsum(-1).flip(-1) * mask
    corr = batch["importance_sampling_ratio"]
    assert not torch.allclose(corr, torch.ones_like(corr))
    expected = BETA * (corr * carried).sum() / (mask.size(0) * MAX_LEN)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["k2", "full"])
def test_sampler_correction_multiplies_the_kl_loss(setup, mode, estimator):
    """(c) kl_placement='loss', kl_importance_weight="token": TRL's correction multiplies the KL term as it does
    TRL's surrogate (stock TRL's own KL term gets none): beta * sum_i,t corr * k_it / (B * L) at ratio 1."""
    batch = _on_policy(setup, eg.TrainerConfig(kl_estimator=estimator, kl_placement="loss"), mode, 3.0)
    loss, _ = _trainer_loss(setup.trainer, batch)
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        logps, logits = _forward(setup.trainer, batch)
        if estimator == "k2":
            per_token = kl.k2(logps, batch["ref_per_token_logps"])
        else:
            ref_logits = _forward(setup.trainer, batch, setup.trainer.ref_model)[1]
            per_token = kl.full_kl(logits, ref_logits).view_as(logps)
    corr = batch["importance_sampling_ratio"]
    expected = BETA * (corr * per_token * mask).sum() / (mask.size(0) * MAX_LEN)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    uncorrected = {**batch, "importance_sampling_ratio": torch.ones_like(corr)}
    assert abs(float(loss) - float(setup.trainer._compute_loss(setup.trainer.model, uncorrected).detach())) > 1e-4


def test_sequence_weight_is_the_whole_ratio_to_the_engine(setup):
    """kl_importance_weight="sequence", reward placement: the loss is beta * sum_i W_i sum_t R_it / (B * L) with
    W_i = pi_theta(y_i) / q(y_i) from the engine's log-probs (its NaN token counting as no mismatch), R the
    return-to-go penalty of the current policy; TRL's cap and correction do not enter."""
    for mode, cap in (("sequence_mask", 3.0), ("token_truncate", 3.0), (None, None)):
        batch = _configure(setup, eg.TrainerConfig("sequence"), mode, cap)
        loss, _ = _trainer_loss(setup.trainer, batch)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            logps, _ = _forward(setup.trainer, batch)
        log_w = (torch.nan_to_num(logps - batch["sampling_per_token_logps"]) * mask).sum(-1, keepdim=True)
        assert float(log_w.exp().max()) > 3.0  # TRL's cap would bind: the exact weight is not capped
        penalty = (logps - batch["ref_per_token_logps"]) * mask
        carried = penalty.flip(-1).cumsum(-1).flip(-1) * mask
        expected = BETA * (log_w.exp() * carried).sum() / (mask.size(0) * MAX_LEN)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# (e) the metrics show the mismatch
# ---------------------------------------------------------------------------------------------------


def test_metrics_show_the_mismatch(setup):
    """TRL logs |log pi_old - log q| (sampling/sampling_logp_difference) and its correction; trl_kl adds the
    weights of the whole ratio pi_theta(y) / q(y): is/ess, is/seq_weight_mean, is/seq_weight_max."""
    metrics = _trl.metrics(setup.trainer, "train")
    batch = _configure(setup, eg.TrainerConfig(), "sequence_mask", 3.0)
    mask = batch["completion_mask"].bool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = setup.trainer._generate_and_score_completions([{"prompt": p, "answer": a} for p, a in PROMPTS])
    difference = (fresh["old_per_token_logps"] - fresh["sampling_per_token_logps"]).abs()[mask]
    difference = difference[~torch.isnan(difference)]
    assert metrics["sampling/sampling_logp_difference/mean"][-1] == pytest.approx(float(difference.mean()), rel=1e-5)
    assert metrics["sampling/sampling_logp_difference/max"][-1] == pytest.approx(float(difference.max()), rel=1e-5)
    assert metrics["sampling/sampling_logp_difference/mean"][-1] > 0.5
    setup.trainer._compute_loss(setup.trainer.model, dict(batch))
    with torch.no_grad():
        logps, _ = _forward(setup.trainer, batch)
    log_w = (torch.nan_to_num(logps - batch["sampling_per_token_logps"]) * mask).sum(-1)
    assert metrics["is/ess"][-1] == pytest.approx(float(effective_sample_size(log_w)), rel=1e-4)
    assert metrics["is/seq_weight_mean"][-1] == pytest.approx(float(log_w.exp().mean()), rel=1e-4)
    assert metrics["is/seq_weight_max"][-1] == pytest.approx(float(log_w.exp().max()), rel=1e-4)
    policy_only = (logps - batch["old_per_token_logps"]) * mask
    assert metrics["is/ess"][-1] < 0.9 < float(effective_sample_size(policy_only.sum(-1)))  # the engine's part shows


def test_metrics_are_one_without_a_sampler_mismatch(setup):
    """No vLLM and on-policy (no old log-probs): every weight is 1, logged as such."""
    trainer = setup.trainer
    batch = _configure(setup, eg.TrainerConfig(), None, None)
    for key in ("old_per_token_logps", "sampling_per_token_logps"):
        batch.pop(key, None)
    trainer.use_vllm = False
    try:
        trainer._compute_loss(trainer.model, batch)
    finally:
        trainer.use_vllm = True
    metrics = _trl.metrics(trainer, "train")
    assert [metrics[k][-1] for k in ("is/ess", "is/seq_weight_mean", "is/seq_weight_max", "is/ratio_max")] == [1.0] * 4


# ---------------------------------------------------------------------------------------------------
# The config: what is refused, what composes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["return_to_go", "token"])
def test_gspo_with_per_token_kl_is_refused(tmp_path, scope):
    with pytest.raises(ValueError, match=r"importance_sampling_level='sequence' \(GSPO\).*biased.*0\.64"):
        make_config(tmp_path, importance_sampling_level="sequence", kl_reward_scope=scope)
    make_config(tmp_path, importance_sampling_level="sequence", kl_reward_scope=scope, allow_unsound_kl=True)
    make_config(tmp_path, importance_sampling_level="sequence", kl_reward_scope=scope, kl_importance_weight="sequence")
    make_config(tmp_path, importance_sampling_level="sequence", kl_reward_scope="sequence")
    make_config(tmp_path, importance_sampling_level="sequence", kl_estimator="k2", kl_placement="loss")
    make_config(tmp_path, importance_sampling_level="sequence", beta=0.0)


def test_trainer_form_of_a_real_config(tmp_path):
    """trainer_form reads a GRPOConfig as it reads the harness's TrainerConfig (the same field names)."""
    for fields in (dict(), dict(kl_importance_weight="sequence"), dict(kl_estimator="k2", kl_placement="loss"),
                   dict(kl_importance_weight="sequence", kl_estimator="k3", kl_placement="loss")):
        args = make_config(tmp_path, loss_type="dr_grpo", **fields)
        assert eg.trainer_form(args) == eg.trainer_form(eg.TrainerConfig(**fields, use_vllm=False))
    assert eg.trainer_form(make_config(tmp_path, loss_type="dr_grpo")) == eg.Form(ppo_clip=EPSILON)
    with pytest.raises(ValueError, match="clipped-surrogate"):
        eg.trainer_form(make_config(tmp_path, loss_type="sapo"))

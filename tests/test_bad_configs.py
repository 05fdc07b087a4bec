"""The bad-config matrix (docs/reliability.md#before-training): every config field trl_kl owns or relies on, given a
value of the wrong type, a non-finite number or one out of range, and every rule between fields, fails when the
config is constructed, with a ``ValueError`` that names the field; the values just inside the ranges construct.

Before these checks, a string batch size or ``num_generations=None`` was a bare ``TypeError`` in TRL's
``__post_init__`` (``num_generations=0`` a ``ZeroDivisionError``), a negative learning rate, ``temperature=0``, an
unknown ``loss_type``, ``top_k=-5`` or PPO's ``normalize_then_sum`` failed only inside ``train()`` (torch,
transformers' ``generate``, TRL, or a ``KeyError``), and ``max_grad_norm=nan``, ``top_p=1.5``, ``ld_alpha=1.5``,
PPO's ``scale_rewards`` or ``label_smoothing`` with DPO's sigmoid loss trained without a word.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from trl_kl import DPOConfig, GRPOConfig, PPOConfig

NAN, INF = math.nan, math.inf
COMMON = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4)
CONFIGS = {
    "grpo": (GRPOConfig, dict(num_generations=2, beta=0.04)),
    "ppo": (PPOConfig, dict(beta=0.04)),
    "dpo": (DPOConfig, {}),
}
ALL, RL = ("grpo", "ppo", "dpo"), ("grpo", "ppo")


def build(kind: str, **overrides):
    config, base = CONFIGS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config(**{**COMMON, **base, **overrides})


# (trainers, overrides, the field the message must name). One row per bad value; a field shared by several configs
# is tried on each.
BAD = [
    # transformers' optimisation fields and the non-finite guard's switch (all three configs)
    (ALL, dict(per_device_train_batch_size="4"), "per_device_train_batch_size"),
    (ALL, dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
    (ALL, dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (ALL, dict(gradient_accumulation_steps=2.0), "gradient_accumulation_steps"),
    (ALL, dict(learning_rate=0.0), "learning_rate"),
    (ALL, dict(learning_rate=-1e-5), "learning_rate"),
    (ALL, dict(learning_rate=NAN), "learning_rate"),
    (ALL, dict(learning_rate="1e-5"), "learning_rate"),
    (ALL, dict(max_grad_norm=NAN), "max_grad_norm"),
    (ALL, dict(max_grad_norm=-1.0), "max_grad_norm"),
    (ALL, dict(max_grad_norm=None), "max_grad_norm"),
    (ALL, dict(skip_nonfinite_steps="no"), "skip_nonfinite_steps"),
    (ALL, dict(skip_nonfinite_steps=1), "skip_nonfinite_steps"),
    # TRL's rollout fields (GRPO, PPO)
    (RL, dict(num_generations=None), "num_generations"),
    (RL, dict(num_generations="2"), "num_generations"),
    (RL, dict(num_generations=0), "num_generations"),
    (RL, dict(num_generations=2.0), "num_generations"),
    (RL, dict(num_generations_eval=0), "num_generations_eval"),
    (RL, dict(generation_batch_size="8"), "generation_batch_size"),
    (RL, dict(generation_batch_size=0), "generation_batch_size"),
    (RL, dict(steps_per_generation="2"), "steps_per_generation"),
    (RL, dict(steps_per_generation=0), "steps_per_generation"),
    (RL, dict(num_iterations=0), "num_iterations"),
    (RL, dict(num_iterations=1.5), "num_iterations"),
    (RL, dict(num_iterations=True), "num_iterations"),
    (RL, dict(max_completion_length=0), "max_completion_length"),
    (RL, dict(max_completion_length=4.0), "max_completion_length"),
    (RL, dict(temperature=0.0), "temperature"),
    (RL, dict(temperature=NAN), "temperature"),
    (RL, dict(temperature="1.0"), "temperature"),
    (RL, dict(top_p=0.0), "top_p"),
    (RL, dict(top_p=1.5), "top_p"),
    (RL, dict(top_p="0.9"), "top_p"),
    (RL, dict(top_k=-5), "top_k"),
    (RL, dict(top_k="50"), "top_k"),
    (RL, dict(min_p=-0.1), "min_p"),
    (RL, dict(min_p=NAN), "min_p"),
    (RL, dict(repetition_penalty=0.0), "repetition_penalty"),
    (RL, dict(epsilon=-0.1), "epsilon"),
    (RL, dict(epsilon=NAN), "epsilon"),
    (RL, dict(epsilon_high=INF), "epsilon_high"),
    (RL, dict(delta=0.0), "delta"),
    (RL, dict(beta=-0.1), "beta"),
    (RL, dict(beta=NAN), "beta"),
    (RL, dict(beta="0.1"), "beta"),
    (RL, dict(reward_weights=[NAN]), "reward_weights"),
    (RL, dict(reward_weights=["1"]), "reward_weights"),
    (RL, dict(loss_type="foo"), "loss_type"),
    (RL, dict(importance_sampling_level="foo"), "importance_sampling_level"),
    (RL, dict(multi_objective_aggregation="foo"), "multi_objective_aggregation"),
    (RL, dict(scale_rewards=1), "scale_rewards"),
    (("grpo",), dict(scale_rewards="sequence"), "scale_rewards"),
    (RL, dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (RL, dict(sapo_temperature_pos=NAN), "sapo_temperature_pos"),
    (RL, dict(vespo_k_pos=NAN), "vespo_k_pos"),
    (RL, dict(vespo_lambda_pos=INF), "vespo_lambda_pos"),
    (RL, dict(vespo_k_neg=NAN), "vespo_k_neg"),
    (RL, dict(vespo_lambda_neg="2"), "vespo_lambda_neg"),
    (RL, dict(entropy_coef=NAN), "entropy_coef"),
    (RL, dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (RL, dict(off_policy_mask_threshold=-1.0), "off_policy_mask_threshold"),
    (RL, dict(mask_truncated_completions="no"), "mask_truncated_completions"),
    (RL, dict(use_vllm="no"), "use_vllm"),
    (RL, dict(vllm_importance_sampling_correction=1), "vllm_importance_sampling_correction"),
    (RL, dict(use_adaptive_entropy="yes"), "use_adaptive_entropy"),
    (RL, dict(vllm_importance_sampling_mode="foo"), "vllm_importance_sampling_mode"),
    (RL, dict(vllm_importance_sampling_clip_max=0.0), "vllm_importance_sampling_clip_max"),
    (RL, dict(vllm_importance_sampling_clip_min=NAN), "vllm_importance_sampling_clip_min"),
    (RL, dict(generation_kwargs={"top_p": "0.9"}), "generation_kwargs['top_p']"),  # was a bare TypeError
    (RL, dict(generation_kwargs={"top_k": 2.5}), "generation_kwargs['top_k']"),
    (RL, dict(generation_kwargs={"temperature": 0.0}), "generation_kwargs['temperature']"),
    (RL, dict(generation_kwargs={"do_sample": "yes"}), "generation_kwargs['do_sample']"),
    # TR-DPO's reference sync (all three)
    (ALL, dict(sync_ref_model="no"), "sync_ref_model"),
    (ALL, dict(sync_ref_model=True, ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha"),
    (ALL, dict(sync_ref_model=True, ref_model_sync_steps=0), "ref_model_sync_steps"),
    # trl_kl's KL fields (GRPO, PPO)
    (RL, dict(kl_estimator="k4"), "kl_estimator"),
    (RL, dict(kl_placement=1), "kl_placement"),
    (RL, dict(kl_estimator="k3_clip", k3_clip_max=NAN), "k3_clip_max"),
    (RL, dict(kl_estimator="full", kl_placement="loss", full_kl_token_chunk_size=0), "full_kl_token_chunk_size"),
    (RL, dict(kl_estimator="full", kl_placement="loss", full_kl_vocab_chunk_size=8.0), "full_kl_vocab_chunk_size"),
    (RL, dict(kl_target=0.0), "kl_target"),
    (RL, dict(kl_target=0.3, kl_horizon=INF), "kl_horizon"),
    (RL, dict(use_bias_correction_kl="no"), "use_bias_correction_kl"),
    (RL, dict(allow_unsound_kl="no"), "allow_unsound_kl"),
    (RL, dict(allow_unsound_kl=1), "allow_unsound_kl"),
    (("grpo",), dict(kl_reward_scope="episode"), "kl_reward_scope"),
    (("grpo",), dict(kl_importance_weight="prefix"), "kl_importance_weight"),
    (("grpo",), dict(clip_std_min=0.0), "clip_std_min"),
    (("grpo",), dict(clip_std_min="0.1"), "clip_std_min"),
    (("grpo",), dict(clip_std_max=INF), "clip_std_max"),
    # PPO's own fields
    (("ppo",), dict(vf_coef=NAN), "vf_coef"),
    (("ppo",), dict(vf_coef=-1.0), "vf_coef"),
    (("ppo",), dict(cliprange_value=0.0), "cliprange_value"),
    (("ppo",), dict(gamma=1.5), "gamma"),
    (("ppo",), dict(lam=NAN), "lam"),
    (("ppo",), dict(value_learning_rate=0.0), "value_learning_rate"),
    (("ppo",), dict(whiten_advantages="no"), "whiten_advantages"),
    # DPO: TRL's fields
    (("dpo",), dict(beta=0.0), "beta"),
    (("dpo",), dict(beta=NAN), "beta"),
    (("dpo",), dict(beta=True), "beta"),
    (("dpo",), dict(loss_type="foo"), "loss_type"),
    (("dpo",), dict(loss_type=["sigmoid", "foo"]), "loss_type"),
    (("dpo",), dict(loss_type=[]), "loss_type"),
    (("dpo",), dict(loss_weights=[NAN]), "loss_weights"),
    (("dpo",), dict(label_smoothing=-0.1, loss_type="robust"), "label_smoothing"),
    (("dpo",), dict(label_smoothing=NAN, loss_type="robust"), "label_smoothing"),
    (("dpo",), dict(label_smoothing=1.0, loss_type="exo_pair"), "label_smoothing"),
    (("dpo",), dict(ld_alpha=1.5), "ld_alpha"),
    (("dpo",), dict(f_divergence_type="foo"), "f_divergence_type"),
    (("dpo",), dict(f_alpha_divergence_coef=NAN), "f_alpha_divergence_coef"),
    (("dpo",), dict(discopop_tau=0.0), "discopop_tau"),
    (("dpo",), dict(max_length=0), "max_length"),
    (("dpo",), dict(max_length="512"), "max_length"),
    (("dpo",), dict(precompute_ref_batch_size=0), "precompute_ref_batch_size"),
    (("dpo",), dict(precompute_ref_log_probs="no"), "precompute_ref_log_probs"),
    (("dpo",), dict(use_weighting=1), "use_weighting"),
    (("dpo",), dict(padding_free="no"), "padding_free"),
    # DPO: trl_kl's fields
    (("dpo",), dict(sft_weight=-1.0), "sft_weight"),
    (("dpo",), dict(sft_weight=True), "sft_weight"),
    (("dpo",), dict(sft_weight="0.5"), "sft_weight"),
    (("dpo",), dict(resample_every=0), "resample_every"),
    (("dpo",), dict(resample_every=True), "resample_every"),
    (("dpo",), dict(resample_every=2, resample_num_prompts=0), "resample_num_prompts"),
    (("dpo",), dict(resample_every=2, resample_num_completions=1), "resample_num_completions"),
    (("dpo",), dict(resample_every=2, resample_num_completions=True), "resample_num_completions"),
    (("dpo",), dict(resample_every=2, resample_max_new_tokens=True), "resample_max_new_tokens"),
    (("dpo",), dict(resample_every=2, resample_max_new_tokens=0), "resample_max_new_tokens"),
    (("dpo",), dict(resample_every=2, resample_temperature=0.0), "resample_temperature"),
    (("dpo",), dict(resample_every=2, resample_temperature=INF), "resample_temperature"),
    (("dpo",), dict(resample_every=2, resample_batch_size="2"), "resample_batch_size"),
    (("dpo",), dict(resample_every=2, resample_mix=1.5), "resample_mix"),
    (("dpo",), dict(resample_every=2, resample_mix=True), "resample_mix"),
    (("dpo",), dict(resample_every=2, reward_weights=[INF]), "reward_weights"),
    (("dpo",), dict(resample_every=2, resample_update_reference="no"), "resample_update_reference"),
]

# Rules between fields: each value is fine alone, the combination cannot be honoured.
INTERACTIONS = [
    (RL, dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),  # dr_grpo divides by it
    (RL, dict(top_k=-1), "top_k"),  # vLLM's "no top-k"; transformers' generate refuses it
    (RL, dict(generation_kwargs={"top_k": -1}), "top_k"),
    (ALL, dict(ref_model_mixup_alpha=0.9), "ref_model_mixup_alpha"),  # TRL ignores it without sync_ref_model
    (ALL, dict(ref_model_sync_steps=64), "ref_model_sync_steps"),
    (("ppo",), dict(scale_rewards="none"), "scale_rewards"),  # PPO's advantages are GAE's, whitened
    (("ppo",), dict(scale_rewards="batch"), "scale_rewards"),
    (("ppo",), dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),  # KeyError
    (("ppo",), dict(loss_type="vespo"), "vespo"),
    (RL, dict(beta=0.0, kl_estimator="k3"), "beta=0"),
    (RL, dict(beta=0.0, kl_target=0.3), "kl_target"),
    (RL, dict(kl_horizon=500.0), "kl_horizon"),  # without kl_target
    (RL, dict(k3_clip_max=5.0), "k3_clip_max"),  # without k3_clip
    (RL, dict(kl_estimator="k1", kl_placement="loss"), "kl_estimator='k1'"),  # unsound
    (RL, dict(use_bias_correction_kl=True), "use_bias_correction_kl"),  # reward placement
    (RL, dict(top_p=0.9), "top_p"),  # a truncated sampler with a KL term
    (("grpo",), dict(clip_std_min=0.5, clip_std_max=0.1), "clip_std_min"),
    (("grpo",), dict(scale_rewards="none", clip_std_min=0.1), "clip_std_min"),
    (("grpo",), dict(multi_objective_aggregation="normalize_then_sum", clip_std_max=1.0), "clip_std_min"),
    (("grpo",), dict(kl_placement="loss", kl_estimator="k2", kl_reward_scope="token"), "kl_reward_scope"),
    (("grpo",), dict(loss_type="vespo"), "vespo"),
    (("grpo",), dict(importance_sampling_level="sequence"), "importance_sampling_level"),  # GSPO, per-token KL
    (("dpo",), dict(label_smoothing=0.1), "label_smoothing"),  # TRL's sigmoid loss ignores it
    (("dpo",), dict(label_smoothing=0.5, loss_type="robust"), "label_smoothing"),  # divides by 1 - 2 eps
    (("dpo",), dict(loss_type="exo_pair"), "label_smoothing"),  # log(label_smoothing)
    (("dpo",), dict(resample_mix=0.5), "resample_mix"),  # without resample_every
    (("dpo",), dict(resample_every=2, resample_update_reference=True, sync_ref_model=True),
     "resample_update_reference"),
    (("dpo",), dict(sft_weight=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]), "sft_weight"),
]

# Values at the edges of the ranges, and the other spellings TRL allows: they construct.
GOOD = [
    (ALL, dict(max_grad_norm=0.0, learning_rate=1e-30, skip_nonfinite_steps=True)),
    (ALL, dict(sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)),
    (RL, dict(temperature=0.01, top_p=None, top_k=None, min_p=0.0, repetition_penalty=1.0, epsilon=0.0,
              epsilon_high=0.0, delta=1.5, entropy_coef=-0.01, reward_weights=[1, 0.5], num_generations_eval=2)),
    # with the KL in the advantage TRL's loss masks are refused (test_config.py)
    (RL, dict(beta=0, top_entropy_quantile=0.0, off_policy_mask_threshold=0.5)),
    (RL, dict(top_k=-1, use_vllm=True, vllm_importance_sampling_clip_min=0.0, vllm_importance_sampling_clip_max=None,
              vllm_importance_sampling_mode="token_mask")),
    (RL, dict(loss_type="grpo", max_completion_length=None, scale_rewards=True, num_iterations=3,
              generation_kwargs={"top_p": 1.0, "top_k": 0, "temperature": 1.0, "do_sample": True})),
    (RL, dict(beta=0, learning_rate=1)),  # ints where TRL's fields are floats (YAML gives them)
    (RL, dict(beta=0, repetition_penalty=1.3)),  # with a KL term: refused (test_config.py, reshaped sampling)
    (("ppo",), dict(gamma=0.0, lam=1.0, vf_coef=0.0, value_learning_rate=1e-3, whiten_advantages=False,
                    num_generations=1)),
    (("grpo",), dict(clip_std_min=0.1, clip_std_max=0.1, scale_rewards=True, beta=0.0)),
    (("dpo",), dict(beta=1e-3, label_smoothing=0.49, loss_type="robust", ld_alpha=0.0, max_length=None,
                    loss_weights=[2.0], f_divergence_type="alpha_divergence", discopop_tau=0.01)),
    (("dpo",), dict(loss_type=["exo_pair", "aot"], label_smoothing=1e-3)),
    (("dpo",), dict(resample_every=1, resample_num_completions=2, resample_mix=1, resample_temperature=0.5,
                    reward_weights=[1.0], resample_max_new_tokens=1, sft_weight=0)),
]


def _cases(rows):
    for kinds, overrides, *field in rows:
        for kind in kinds:
            label = ",".join(f"{k}={v!r}" for k, v in overrides.items())
            yield pytest.param(kind, overrides, *field, id=f"{kind}-{label}")


@pytest.mark.parametrize("kind, overrides, field", list(_cases(BAD)))
def test_a_bad_value_fails_at_construction_naming_the_field(kind, overrides, field):
    with pytest.raises(ValueError) as error:
        build(kind, **overrides)
    assert field in str(error.value), f"the message does not name {field}: {error.value}"
    assert type(error.value) is ValueError  # not a TypeError or ZeroDivisionError from TRL's arithmetic


@pytest.mark.parametrize("kind, overrides, field", list(_cases(INTERACTIONS)))
def test_a_bad_combination_fails_at_construction_naming_the_field(kind, overrides, field):
    with pytest.raises(ValueError) as error:
        build(kind, **overrides)
    assert field in str(error.value), f"the message does not name {field}: {error.value}"


@pytest.mark.parametrize("kind, overrides", list(_cases(GOOD)))
def test_values_inside_the_ranges_construct(kind, overrides):
    config = build(kind, **overrides)
    for name, value in overrides.items():
        if name not in ("scale_rewards", "loss_type", "num_generations"):  # TRL normalises these
            assert getattr(config, name) == value


def _own_fields(config_class) -> dict[str, str]:
    """The boolean and numeric fields trl_kl declares itself (not TRL's), with their annotation."""
    own = {}
    for klass in config_class.__mro__:
        if klass.__module__.startswith("trl_kl"):
            own.update({name: str(kind) for name, kind in vars(klass).get("__annotations__", {}).items()})
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {n: k for n, k in own.items() if n in fields and any(t in k for t in ("bool", "int", "float"))}


@pytest.mark.parametrize("kind", ALL)
def test_every_numeric_or_boolean_field_of_trl_kl_is_checked(kind):
    """A field trl_kl adds cannot escape the checks: each one given a string fails naming it (fields added later
    included), with the fields it needs to act set (resample_every for the resampling fields)."""
    fields = _own_fields(CONFIGS[kind][0])
    assert len(fields) >= (4 if kind == "dpo" else 8)
    for name in fields:
        extra = {"resample_every": 2} if name.startswith("resample_") and name != "resample_every" else {}
        with pytest.raises(ValueError, match=name):
            build(kind, **extra, **{name: "x"})


def test_the_docs_state_the_size_of_the_matrix():
    """docs/reliability.md#before-training states the size of this matrix."""
    from pathlib import Path

    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text().split())
    bad, combinations = len(list(_cases(BAD))), len(list(_cases(INTERACTIONS)))
    fields = len({row[2] for row in BAD})
    assert f"{bad} bad values of {fields} fields" in doc and f"{combinations} bad combinations" in doc, (bad, fields,
                                                                                                      combinations)

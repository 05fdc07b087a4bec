"""trl_kl.config: the field validators, the resolved KL settings, and the rules every RL config shares."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from grpo_batch import make_config
from trl_kl import GRPOConfig, PPOConfig
from trl_kl.config import KLConfigMixin, KLSettings, check_bool, check_choice, check_int, check_number

# ---------------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_accepts_bools(value):
    check_bool("flag", value)


@pytest.mark.parametrize("value", [1, 0, "false", None, 1.0])
def test_check_bool_refuses_everything_else(value):
    with pytest.raises(ValueError, match=rf"^flag must be True or False, got {value!r}\.$"):
        check_bool("flag", value)


@pytest.mark.parametrize("value, kwargs", [
    (0, dict(at_least=0)), (1, dict(at_least=0, at_most=1)), (0.5, dict(greater_than=0, less_than=1)),
    (-3, {}), (None, dict(optional=True)), (1e300, dict(greater_than=0)),
])
def test_check_number_accepts(value, kwargs):
    check_number("x", value, **kwargs)


@pytest.mark.parametrize("value, kwargs, message", [
    (1.5, dict(at_least=0, at_most=1), "x must be in [0, 1], got 1.5."),
    (0.0, dict(greater_than=0, at_most=1), "x must be in (0, 1], got 0.0."),
    (1.0, dict(at_least=0, less_than=1), "x must be in [0, 1), got 1.0."),
    (0, dict(greater_than=0), "x must be a finite number > 0, got 0."),
    (float("nan"), dict(at_least=0), "x must be a finite number >= 0, got nan."),
    (float("inf"), dict(greater_than=0), "x must be a finite number > 0, got inf."),
    (2.0, dict(less_than=1), "x must be a finite number < 1, got 2.0."),
    (True, {}, "x must be a finite number, got True."),
    ("0.1", dict(greater_than=0), "x must be a finite number > 0, got '0.1'."),
    (None, dict(greater_than=0), "x must be a finite number > 0, got None."),
    (0, dict(greater_than=0, optional=True, why="a KL"), "x must be a finite number > 0 or None (a KL), got 0."),
    (0.5, dict(greater_than=1, why="a clamp"), "x must be a finite number > 1 (a clamp), got 0.5."),
])
def test_check_number_refuses_with_the_requirement(value, kwargs, message):
    with pytest.raises(ValueError) as error:
        check_number("x", value, **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(at_least=1), "n must be an integer >= 1, got 0."),
    (2.0, dict(at_least=1), "n must be an integer >= 1, got 2.0."),
    (True, dict(at_least=0), "n must be an integer >= 0, got True."),
    (9, dict(at_least=1, at_most=8), "n must be an integer in [1, 8], got 9."),
    (0, dict(at_least=1, optional=True), "n must be an integer >= 1 or None, got 0."),
])
def test_check_int(value, kwargs, message):
    with pytest.raises(ValueError) as error:
        check_int("n", value, **kwargs)
    assert str(error.value) == message
    check_int("n", 3, at_least=1, at_most=8)
    check_int("n", None, optional=True)


def test_check_choice_compares_types_too():
    check_choice("mode", "a", ("a", "b"))
    check_choice("flag", True, (True, False))
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'\.$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="got 1"):
        check_choice("flag", 1, (True, False))  # 1 == True, but it is not a bool


# ---------------------------------------------------------------------------------------------------
# The resolved settings
# ---------------------------------------------------------------------------------------------------


def test_kl_settings_resolve_the_fields_once(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = make_config(tmp_path, kl_estimator="k3_clip", kl_placement="loss", k3_clip_max=5.0, kl_target=0.3,
                           kl_horizon=500.0)
    settings = args.kl_settings()
    assert settings == KLSettings(estimator="k3_clip", placement="loss", reward_scope="return_to_go", k3_clip_max=5.0,
                                  bias_correction=False, token_chunk_size=None, vocab_chunk_size=None, target=0.3,
                                  horizon=500.0, importance_weight="token")
    assert not settings.in_reward
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.estimator = "k1"


def test_ppo_settings_have_no_reward_scope(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, beta=0.1)
    assert args.kl_settings().reward_scope is None and args.kl_settings().in_reward


def test_both_rl_configs_share_the_kl_fields():
    kl_fields = {f.name for f in dataclasses.fields(KLConfigMixin)}
    for config in (GRPOConfig, PPOConfig):
        assert issubclass(config, KLConfigMixin)
        assert kl_fields <= {f.name for f in dataclasses.fields(config)}


# ---------------------------------------------------------------------------------------------------
# beta = 0: the KL fields must keep their defaults
# ---------------------------------------------------------------------------------------------------

WITHOUT_BETA = {
    "kl_estimator": dict(kl_estimator="k3"),
    "kl_placement": dict(kl_estimator="k2", kl_placement="loss"),
    "k3_clip_max": dict(kl_estimator="k3_clip", k3_clip_max=5.0),
    "full_kl_vocab_chunk_size": dict(kl_estimator="full", kl_placement="loss", full_kl_vocab_chunk_size=8),
    "kl_horizon": dict(kl_horizon=500.0),
    "use_bias_correction_kl": dict(kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True),
    "allow_unsound_kl": dict(allow_unsound_kl=True),
}


@pytest.mark.parametrize("config", ["grpo", "ppo"])
@pytest.mark.parametrize("overrides", list(WITHOUT_BETA.values()), ids=list(WITHOUT_BETA))
def test_kl_fields_without_beta_raise_naming_the_fix(tmp_path, config, overrides):
    """beta=0 (TRL's default) turns the KL off: a KL field set then would be silently ignored."""
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, beta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"beta=0 turns the KL term off .* set beta > 0"):
            if config == "grpo":
                GRPOConfig(num_generations=2, **common, **overrides)
            else:
                PPOConfig(**common, **overrides)
        # the same fields with beta > 0 are accepted (kl_horizon with its kl_target)
        overrides = {**overrides, **({"kl_target": 0.3} if "kl_horizon" in overrides else {})}
        if config == "grpo":
            GRPOConfig(num_generations=2, **{**common, "beta": 0.04}, **overrides)
        else:
            PPOConfig(**{**common, "beta": 0.04}, **overrides)


def test_grpo_scope_without_beta_raises(tmp_path):
    with pytest.raises(ValueError, match=r"kl_reward_scope='token' would have no effect: set beta > 0"):
        make_config(tmp_path, beta=0.0, kl_reward_scope="token")


def test_defaults_without_beta_are_stock_trl(tmp_path):
    """TRL's default beta=0 with every KL field at its default constructs: no KL, as in TRL."""
    make_config(tmp_path, beta=0.0)
    PPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4)
    GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=2)


def test_kl_horizon_needs_kl_target(tmp_path):
    with pytest.raises(ValueError, match="kl_horizon=500.0 is the horizon of adaptive KL control, which only"):
        make_config(tmp_path, kl_horizon=500.0)
    assert make_config(tmp_path, kl_horizon=500.0, kl_target=0.3).kl_settings().horizon == 500.0


# ---------------------------------------------------------------------------------------------------
# The sequence scope is a per-token form now: what it no longer excludes
# ---------------------------------------------------------------------------------------------------


def test_sequence_scope_composes_with_normalize_then_sum(tmp_path):
    """The penalty is added after normalisation, as for the other scopes, so TRL's normalize_then_sum is fine."""
    args = make_config(tmp_path, kl_reward_scope="sequence", multi_objective_aggregation="normalize_then_sum")
    assert args.kl_settings().reward_scope == "sequence"


def test_vespo_takes_the_sequence_scope_or_no_kl(tmp_path):
    """vespo weights whole sequences by their advantage's sign: a KL the same on every token of a completion
    (sequence scope) keeps that sign per sequence, per-token scopes do not; without KL there is nothing to refuse."""
    make_config(tmp_path, loss_type="vespo", kl_reward_scope="sequence")
    make_config(tmp_path, loss_type="vespo", beta=0.0)
    with pytest.raises(ValueError, match="vespo"):
        make_config(tmp_path, loss_type="vespo", kl_reward_scope="return_to_go")



@pytest.mark.parametrize("mask", [dict(top_entropy_quantile=0.2), dict(off_policy_mask_threshold=0.5)])
def test_trl_loss_masks_refused_when_the_loss_carries_the_kl(tmp_path, mask):
    """TRL multiplies its per-token loss by the entropy mask and the off-policy sequence mask; with the KL in the
    advantage (reward placement, token weight) that would drop the penalty wherever a mask is 0. Where the KL is its
    own term (sequence weight, loss placement) or absent, the masks are TRL's business."""
    for scope in ("return_to_go", "token", "sequence"):
        with pytest.raises(ValueError, match="penalty would be dropped wherever the mask is 0"):
            make_config(tmp_path, kl_reward_scope=scope, **mask)
    make_config(tmp_path, kl_importance_weight="sequence", **mask)
    make_config(tmp_path, kl_estimator="k2", kl_placement="loss", **mask)
    make_config(tmp_path, beta=0.0, **mask)
    make_config(tmp_path, allow_unsound_kl=True, **mask)
    make_config(tmp_path, top_entropy_quantile=1.0)  # TRL's default: no mask
    # PPO: GAE carries the penalty in the advantages the same way
    ppo = dict(cls=PPOConfig, num_generations=1)
    with pytest.raises(ValueError, match="Use kl_placement='loss'"):
        make_config(tmp_path, **ppo, **mask)
    make_config(tmp_path, **ppo, kl_estimator="k2", kl_placement="loss", **mask)
    make_config(tmp_path, **ppo, beta=0.0, **mask)

# ---------------------------------------------------------------------------------------------------
# kl_importance_weight (docs/theory.md#sampler-mismatch)
# ---------------------------------------------------------------------------------------------------


def test_kl_importance_weight_resolves_and_validates(tmp_path):
    assert make_config(tmp_path).kl_settings().importance_weight == "token"
    assert make_config(tmp_path, kl_importance_weight="sequence").kl_settings().importance_weight == "sequence"
    with pytest.raises(ValueError, match=r"kl_importance_weight must be one of \('token', 'sequence'\), got 'prefix'"):
        make_config(tmp_path, kl_importance_weight="prefix")
    with pytest.raises(ValueError, match=r"kl_importance_weight='sequence' would have no effect: set beta > 0"):
        make_config(tmp_path, beta=0.0, kl_importance_weight="sequence")
    assert "kl_importance_weight" not in {f.name for f in dataclasses.fields(PPOConfig)}  # GAE carries PPO's KL


def test_sequence_weight_makes_k1_and_k3_exact_losses(tmp_path):
    """k1 as a loss is unsound and k3 biased on their own; times the sequence weight with its gradient
    (kl_importance_weight='sequence') both are the exact loss form: accepted without allow_unsound_kl, no warning.
    The per-state estimators keep their verdicts."""
    from trl_kl import kl

    kl._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for estimator in ("k1", "k3"):
            make_config(tmp_path, kl_estimator=estimator, kl_placement="loss", kl_importance_weight="sequence")
    assert not [w for w in caught if "kl_estimator" in str(w.message)]
    with pytest.raises(ValueError, match="unsound"):
        make_config(tmp_path, kl_estimator="k1", kl_placement="loss")
    with pytest.raises(ValueError, match="unsound"):
        make_config(tmp_path, kl_estimator="k2", kl_importance_weight="sequence")
    kl._warned.clear()
    with pytest.warns(UserWarning, match="biased"):
        make_config(tmp_path, kl_estimator="k3_clip", kl_placement="loss", kl_importance_weight="sequence")


def test_sequence_weight_and_bias_correction_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="use one of them"):
        make_config(tmp_path, kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True,
                    kl_importance_weight="sequence")


def test_vespo_takes_every_scope_with_the_sequence_weight(tmp_path):
    """With kl_importance_weight='sequence' the KL is its own loss term, not inside the advantage vespo weighs."""
    for scope in ("return_to_go", "token", "sequence"):
        make_config(tmp_path, loss_type="vespo", kl_reward_scope=scope, kl_importance_weight="sequence")


# ---------------------------------------------------------------------------------------------------
# A truncated sampler (top-p, top-k, min-p) with a KL term: TRL issue #6789
# ---------------------------------------------------------------------------------------------------

TRUNCATING = {
    "top_p": dict(top_p=0.9),
    "top_k": dict(top_k=50),
    "min_p": dict(min_p=0.05),
    "generation_kwargs": dict(generation_kwargs={"top_p": 0.95}),
    "greedy": dict(generation_kwargs={"do_sample": False}),
}


@pytest.mark.parametrize("config", ["grpo", "ppo"])
@pytest.mark.parametrize("overrides", list(TRUNCATING.values()), ids=list(TRUNCATING))
def test_truncated_sampling_with_kl_is_refused(tmp_path, config, overrides):
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, beta=0.04)
    build = (lambda **kw: GRPOConfig(num_generations=2, **kw)) if config == "grpo" else PPOConfig
    name, value = next(iter((overrides.get("generation_kwargs") or overrides).items()))
    with pytest.raises(ValueError, match=rf"{name}={value!r} truncates .*TRL issue #6789.*top_p=1\.0, top_k=0"):
        build(**common, **overrides)
    build(**common, **overrides, allow_unsound_kl=True)  # an ablation
    build(**{**common, "beta": 0.0}, **overrides)  # no KL: stock TRL


RESHAPING = {
    "repetition_penalty": dict(repetition_penalty=1.2),
    "generation_kwargs repetition_penalty": dict(generation_kwargs={"repetition_penalty": 1.1}),
    "no_repeat_ngram_size": dict(generation_kwargs={"no_repeat_ngram_size": 3}),
    "generation_kwargs temperature": dict(generation_kwargs={"temperature": 0.7}),
}


@pytest.mark.parametrize("config", ["grpo", "ppo"])
@pytest.mark.parametrize("overrides", list(RESHAPING.values()), ids=list(RESHAPING))
def test_reshaped_sampling_with_kl_is_refused(tmp_path, config, overrides):
    """A sampler reshaped away from the policy at `temperature` (repetition penalty, n-gram ban, another temperature
    in generation_kwargs) draws off-policy rollouts no trainer weight corrects: refused with a KL term."""
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, beta=0.04)
    build = (lambda **kw: GRPOConfig(num_generations=2, **kw)) if config == "grpo" else PPOConfig
    with pytest.raises(ValueError, match=r"changes the distribution the completions are sampled from.*repetition_penalty=1\.0"):
        build(**common, **overrides)
    build(**common, **overrides, allow_unsound_kl=True)  # an ablation
    build(**{**common, "beta": 0.0}, **overrides)  # no KL: stock TRL
    build(**common, generation_kwargs={"temperature": 1.0, "repetition_penalty": 1.0})  # restating the policy's own


def test_untruncated_sampling_settings_are_accepted(tmp_path):
    """TRL's defaults (top_p=1.0, top_k=0, min_p=None) and the other spellings of "off" (top_k=None as in
    transformers, top_k=-1 as in vLLM, min_p=0, generation_kwargs that restate them) construct with a KL term."""
    for overrides in (dict(), dict(top_k=-1, use_vllm=True), dict(top_k=None), dict(min_p=0.0),
                      dict(generation_kwargs={"top_p": 1.0, "top_k": 0, "do_sample": True, "num_beams": 1})):
        make_config(tmp_path, **overrides)

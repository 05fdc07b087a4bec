"""The off-policy exact-gradient harness (trl_kl.exact_gradients, docs/theory.md#sampler-mismatch) and the docs
it generates (tools/kl_tables.py).

The harness's pieces are checked against brute force (groups enumerated one by one, finite differences,
hand-computed truncations); the tables of docs/kl_gradient_bias.md are computed once (``tables``) and the rows
that must be exact, and those that must not, are pinned on every seed and scenario the doc shows.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from trl_kl import exact_gradients as eg
from trl_kl import importance
from trl_kl.advantages import group_normalized_advantages
from trl_kl.exact_gradients import Form

ROOT = Path(__file__).resolve().parent.parent
COVERED = ("stale", "engine", "stale_engine", "engine_far")  # q covers pi_theta
ENGINE_AT_THETA_OLD = ("engine", "engine_far")  # pi_old = pi_theta: the first optimizer step on a rollout
SEQ = dict(correction="sequence_mask")  # TRL's sequence correction without a cap: pi_old(y) / q(y)
EXACT = dict(ratio="sequence_product", correction="sequence_mask", penalty_from="current")


def _kl_tables():
    spec = importlib.util.spec_from_file_location("kl_tables", ROOT / "tools" / "kl_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kl_tables"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kt():
    return _kl_tables()


@pytest.fixture(scope="module")
def tables(kt):
    with eg.single_thread():
        return kt.compute()


def row(rows, **fields) -> eg.OffPolicyRow:
    (found,) = [r for r in rows if r.form == Form(**fields)]
    return found


def mean_err(r: eg.OffPolicyRow, scenario: str) -> float:
    return sum(r.at("rel_err", scenario)) / len(r.at("rel_err", scenario))


# ---------------------------------------------------------------------------------------------------
# The harness's pieces against brute force
# ---------------------------------------------------------------------------------------------------


def test_truncated_log_probs_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    top2 = eg.truncated_log_probs(logits, top_k=2).exp()
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    # top-p 0.8: keep the smallest prefix reaching 0.8 (0.5 + 0.3), nothing after it
    p08 = eg.truncated_log_probs(logits, top_p=0.8).exp()
    torch.testing.assert_close(p08, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    p081 = eg.truncated_log_probs(logits, top_p=0.81).exp()
    torch.testing.assert_close(p081, torch.tensor([[0.5, 0.3, 0.15, 0.0]], dtype=torch.float64) / 0.95)


def test_rollout_support_and_missing_mass():
    setup = eg.make_setup(3, 3, 0, "engine_top_p")
    r = eg.rollout(setup)
    assert 0 < r.q.numel() < 27 and float(r.q.sum()) == pytest.approx(1.0, abs=1e-12)
    p = eg.sequence_probs(setup.policy)
    kept = torch.isfinite(eg._gather(setup.sampler_log_probs, setup.policy.states, setup.policy.tokens)).all(-1)
    assert r.missing == pytest.approx(float(p[~kept].sum()), abs=1e-15) and r.missing > 0.01
    on = eg.rollout(eg.make_setup(3, 3, 0, "on_policy"))
    assert on.missing == 0 and torch.equal(on.old, on.logp.detach())
    torch.testing.assert_close(on.sampling, on.old, rtol=0, atol=1e-15)


def test_exact_reward_gradient_matches_finite_differences():
    setup = eg.make_setup(2, 2, 3, "stale")
    g = eg.exact_reward_gradient(setup)
    eps, flat = 1e-6, setup.policy.logits.detach().view(-1)
    fd = torch.zeros_like(g)
    for i in range(flat.numel()):
        values = []
        for step in (eps, -eps):
            logits = flat.clone()
            logits[i] += step
            logp = eg._gather(torch.log_softmax(logits.view_as(setup.policy.logits), -1), setup.policy.states,
                              setup.policy.tokens)
            values.append(float((logp.sum(-1).exp() * setup.reward).sum()))
        fd[i] = (values[0] - values[1]) / (2 * eps)
    assert float((fd - g).abs().max()) < 1e-8 and float(g.norm()) > 0.01


def test_conditional_advantages_match_group_by_group_enumeration():
    rewards = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)
    probs = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    for scale in ("group", "none"):
        mean, second = eg.conditional_advantages(rewards, probs, 3, scale)
        for y in range(3):
            m = s = 0.0
            for mates in itertools.product(range(3), repeat=2):
                a = float(group_normalized_advantages(rewards[[y, *mates]], 3, scale)[0])
                w = float(probs[list(mates)].prod())
                m, s = m + w * a, s + w * a * a
            assert float(mean[y]) == pytest.approx(m, abs=1e-12) and float(second[y]) == pytest.approx(s, abs=1e-12)


@pytest.mark.parametrize("scenario", ["stale_engine", "engine_top_p"])
def test_reward_term_moments_match_explicit_groups(scenario):
    """evaluate's reward term (loss linear in the advantage, E[A | y] and E[A^2 | y]) equals the mean and
    variance of the per-member gradient over every explicitly enumerated group of G = 2 drawn from q."""
    setup = eg.make_setup(2, 2, 1, scenario)
    form = Form(term="reward", scale="group", correction="sequence_mask", cap=3.0)
    stats = eg.evaluate(setup, form, group_size=2)
    r = eg.rollout(setup)
    n = r.q.numel()
    mean, second = torch.zeros_like(stats.mean), 0.0
    for y, mate in itertools.product(range(n), repeat=2):
        adv = group_normalized_advantages(r.reward[[y, mate]], 2, "group")[0]
        losses = eg.per_sample_loss(r, form, torch.full_like(r.mask, float(adv)))
        (g,) = torch.autograd.grad(losses[y], setup.policy.logits, retain_graph=True)
        w = float(r.q[y] * r.q[mate])
        mean, second = mean + w * g.reshape(-1), second + w * float((g * g).sum())
    torch.testing.assert_close(stats.mean, mean, rtol=1e-10, atol=1e-12)
    assert stats.variance == pytest.approx(second - float(mean @ mean), rel=1e-9)


def test_form_rejects_what_the_trainer_cannot_form():
    with pytest.raises(ValueError, match="ratio"):
        Form(placement="loss", ratio="per_decision")
    with pytest.raises(ValueError, match="correction"):
        Form(correction="sequence")
    with pytest.raises(ValueError, match="per-decision"):
        Form(ratio="per_decision", correction="sequence_mask")
    with pytest.raises(ValueError, match="reward term"):
        Form(term="reward", ppo_clip=0.2)


def test_scenario_statistics():
    on = eg.scenario_stats(eg.make_setup(3, 3, 0, "on_policy"))
    assert (on.missing, on.ess_sequence, on.ess_per_decision, on.masked_at_3, on.ppo_clipped) == (0, 1, 1, 0, 0)
    far = eg.scenario_stats(eg.make_setup(3, 3, 0, "engine_far"))
    assert far.ess_sequence < far.ess_per_decision < 1 and far.masked_at_3 > 0.01 and far.ppo_clipped == 0
    stale = eg.scenario_stats(eg.make_setup(3, 3, 0, "stale"))
    assert stale.logp_difference < 1e-15 and stale.ppo_clipped > 0.1


def test_sequence_prenorm_beta_has_no_effect_on_equal_rewards():
    """The trainer's sequence scope before normalisation: a group of equal rewards gets advantages that do not
    depend on beta (the group std is beta times the std of the penalties), the issue's +-1.16."""
    rewards, penalties = torch.ones(3, dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    a = group_normalized_advantages(rewards - 0.1 * penalties, 3)
    b = group_normalized_advantages(rewards - 10.0 * penalties, 3)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=0)  # TRL's + 1e-4 in the divisor is all that differs
    assert float(a.abs().max()) > 1.0


# ---------------------------------------------------------------------------------------------------
# The tables of docs/kl_gradient_bias.md: rows that must be exact and rows that must not
# ---------------------------------------------------------------------------------------------------


def test_docs_are_current(kt, tables):
    stale = kt.stale_documents(tables)
    assert not stale, f"{stale}: regenerate with `python tools/kl_tables.py`"


def test_check_mode_names_a_stale_doc(kt, tables, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kt, "compute", lambda: tables)
    monkeypatch.setattr(kt, "DOCS_DIR", tmp_path)
    assert kt.main(["--check"]) == 1
    assert "kl_gradient_bias.md is not current" in capsys.readouterr().err
    assert kt.main([]) == 0 and kt.main(["--check"]) == 0
    (tmp_path / "kl_estimators.md").write_text("edited by hand")
    assert kt.main(["--check"]) == 1


@pytest.mark.parametrize(
    "fields",
    [dict(EXACT), dict(ratio="per_decision", penalty_from="current"), dict(scope="sequence", **EXACT),
     dict(placement="loss", estimator="k1", scope="-", ratio="sequence_product_grad", **SEQ),
     dict(placement="loss", estimator="k3", scope="-", ratio="sequence_product_grad", **SEQ)],
)
def test_exact_under_every_sampler_that_covers_the_policy(tables, fields):
    r = row(tables.kl_rows, **fields)
    for scenario in ("on_policy", *COVERED):
        assert r.verdict(scenario) == "exact", scenario
    assert mean_err(r, "engine_top_p") > 0.1  # truncation: nothing is exact


def test_reward_term_exact_with_the_sequence_weight(tables):
    r = row(tables.reward, term="reward", scale="none", ratio="sequence_product", **SEQ)
    assert all(r.verdict(s) == "exact" for s in ("on_policy", *COVERED))
    token = row(tables.reward, term="reward", scale="none", **SEQ)
    assert all(token.verdict(s) == "exact" for s in ENGINE_AT_THETA_OLD)
    assert min(token.at("rel_err", "stale")) > 0.05


def test_trl_token_ratio_with_sequence_correction_exact_only_at_theta_old(tables):
    r = row(tables.kl_rows, **SEQ)
    assert all(r.verdict(s) == "exact" for s in ("on_policy", *ENGINE_AT_THETA_OLD))
    assert min(r.at("rel_err", "stale")) > 0.05 and min(r.at("rel_err", "stale_engine")) > 0.05


def test_token_level_sampler_corrections_and_none_are_biased(tables):
    for fields in (dict(), dict(correction="token_mask")):
        r = row(tables.kl_rows, **fields)
        assert r.verdict("on_policy") == "exact"
        assert all(min(r.at("rel_err", s)) > 0.05 for s in COVERED), fields
    for mode in ("token_mask", "token_truncate"):
        assert min(row(tables.truncation, correction=mode, cap=3.0).at("rel_err", "engine")) > 0.05


def test_penalty_from_the_engine_is_biased_from_a_stale_policy_too(tables):
    sampler = row(tables.kl_rows, ratio="sequence_product", correction="sequence_mask", penalty_from="sampler")
    assert all(min(sampler.at("rel_err", s)) > 0.05 for s in ENGINE_AT_THETA_OLD)
    old = row(tables.kl_rows, ratio="sequence_product", **SEQ)
    assert all(old.verdict(s) == "exact" for s in ENGINE_AT_THETA_OLD)
    assert min(old.at("rel_err", "stale")) > 0.05


def test_gspo_ratio(tables):
    rtg = row(tables.kl_rows, ratio="sequence", **SEQ)
    assert rtg.verdict("on_policy") == "on-policy" and min(rtg.at("rel_err", "on_policy")) > 0.1
    token = row(tables.kl_rows, scope="token", ratio="sequence", **SEQ)
    for scenario in ("on_policy", *ENGINE_AT_THETA_OLD):  # the token scope becomes grad KL / T
        assert token.verdict(scenario) == "scaled" and token.at("scale", scenario)[0] == pytest.approx(1 / 3)
    sequence = row(tables.kl_rows, scope="sequence", ratio="sequence", **SEQ)
    assert all(sequence.verdict(s) == "exact" for s in ("on_policy", *ENGINE_AT_THETA_OLD))
    assert min(sequence.at("rel_err", "stale")) > 0.1


def test_per_state_forms(tables):
    for fields in (dict(placement="loss", estimator="k2", scope="-", ratio="sequence_product", **SEQ),
                   dict(placement="loss", estimator="full", scope="-", ratio="sequence_product", **SEQ),
                   dict(scope="token", **EXACT), dict(estimator="k3", **EXACT)):
        r = row(tables.kl_rows, **fields)
        assert all(r.verdict(s) == "on-policy" for s in ("on_policy", *COVERED)), fields
    # the trainer's loss placement (per-token detached ratio; none for the exact per-state KL), TRL's own KL
    for fields in (dict(placement="loss", estimator="k2", scope="-", ratio="token"),
                   dict(placement="loss", estimator="full", scope="-", ratio="none"),
                   dict(placement="loss", estimator="k3", scope="-", ratio="token_grad")):
        r = row(tables.kl_rows, **fields)
        assert r.verdict("on_policy") == "on-policy"
        assert all(min(r.at("gap", s)) > 0.01 for s in COVERED), fields


def test_sequence_scope_before_normalisation(tables):
    group = row(tables.kl_rows, scope="sequence_prenorm", scale="group", **SEQ)
    assert all(min(group.at("rel_err", s)) > 0.5 for s in ("on_policy", *COVERED))
    none = row(tables.kl_rows, scope="sequence_prenorm", scale="none", **SEQ)
    for scenario in ("on_policy", *ENGINE_AT_THETA_OLD):
        assert none.verdict(scenario) == "scaled"
        assert none.at("scale", scenario)[0] == pytest.approx(1 - 1 / eg.DEFAULT_GROUP_SIZE, abs=1e-9)


def test_caps_trade_bias_for_variance(tables):
    capped = row(tables.truncation, correction="sequence_mask", cap=3.0)  # TRL's default
    truncated = row(tables.truncation, correction="sequence_truncate", cap=3.0)
    uncapped = row(tables.truncation, correction="sequence_mask")
    assert capped.verdict("on_policy") == "exact" and uncapped.verdict("engine_far") == "exact"
    assert mean_err(capped, "engine_far") > mean_err(truncated, "engine_far") > 0.2
    assert uncapped.mean_variance("engine_far") > 3 * capped.mean_variance("engine_far")


def test_truncating_engine_biases_every_form(tables):
    for r in (*tables.kl_rows, *tables.truncation, *tables.reward):
        assert r.verdict("engine_top_p") in ("biased", "on-policy")
        if r.verdict("on_policy") == "exact":
            assert min(r.at("rel_err", "engine_top_p")) > 0.01 and mean_err(r, "engine_top_p") > 0.1, r.form.name
    stats = [eg.scenario_stats(eg.make_setup(3, 3, s, "engine_top_p")) for s in range(5)]
    assert all(s.ess_sequence > 0.99 and s.missing > 0 for s in stats)  # the ESS does not see it


def test_ppo_clip_inactive_at_theta_old_biased_after_steps(tables):
    for fields in (dict(ppo_clip=0.2, **SEQ), dict(ppo_clip=0.2, **EXACT)):
        r = row(tables.kl_rows, **fields)
        assert all(r.verdict(s) == "exact" for s in ("on_policy", *ENGINE_AT_THETA_OLD))
        assert min(r.at("rel_err", "stale")) > 0.05


def test_per_decision_weights_keep_more_of_the_sample(tables):
    """Per-decision weights have a larger ESS than the sequence weight on every instance; the variance of the
    gradient is lower in stale_engine but not in engine_far (instance facts, quoted in the doc)."""
    for scenario in ("stale", "engine", "stale_engine", "engine_far"):
        for seed in range(5):
            st = eg.scenario_stats(eg.make_setup(3, 3, seed, scenario))
            assert st.ess_per_decision > st.ess_sequence, (scenario, seed)
    per_decision = row(tables.kl_rows, ratio="per_decision", penalty_from="current")
    sequence = row(tables.kl_rows, **EXACT)
    assert per_decision.mean_variance("stale_engine") < sequence.mean_variance("stale_engine")
    assert per_decision.mean_variance("engine_far") > sequence.mean_variance("engine_far")


def test_sampler_factor_is_trls_correction():
    """The harness's sampler factor is importance.sampler_correction of (pi_old, q): with no cap its sequence
    mode times the policy's sequence ratio is the whole weight pi_theta(y) / q(y)."""
    r = eg.rollout(eg.make_setup(3, 3, 2, "stale_engine"))
    corr = importance.sampler_correction(r.old, r.sampling, r.mask, "sequence_mask", None, None)
    whole = importance.sequence_weight(r.logp.detach(), r.sampling, r.mask)
    policy = importance.sequence_weight(r.logp.detach(), r.old, r.mask)
    torch.testing.assert_close(policy * corr, whole, rtol=1e-12, atol=0)
    assert not math.isclose(float(whole.max()), 1.0)


# ---------------------------------------------------------------------------------------------------
# The trainer's options (kl_importance_weight): the trainer table
# ---------------------------------------------------------------------------------------------------


def trainer_row(tables, **fields) -> eg.OffPolicyRow:
    return tables.trainer[eg.TRAINER_CONFIGS.index(eg.TrainerConfig(**fields))]


@pytest.mark.parametrize("fields", [
    dict(kl_importance_weight="sequence"),
    dict(kl_importance_weight="sequence", kl_reward_scope="sequence"),
    dict(kl_importance_weight="sequence", kl_placement="loss", kl_estimator="k1"),
    dict(kl_importance_weight="sequence", kl_placement="loss", kl_estimator="k3"),
])
def test_sequence_weight_is_exact_under_every_covering_sampler(tables, fields):
    r = trainer_row(tables, **fields)
    assert all(r.verdict(s) == "exact" for s in ("on_policy", *COVERED)), fields
    assert mean_err(r, "engine_top_p") > 0.1


def test_token_weight_is_exact_at_theta_old_only(tables):
    """The default: exact on-policy; for an engine mismatch on the first step only up to TRL's cap (binding a
    little in engine, much in engine_far); after optimizer steps on the rollout PPO's approximation."""
    r = trainer_row(tables)
    assert r.verdict("on_policy") == "exact"
    assert 1e-4 < mean_err(r, "engine") < 0.05 and mean_err(r, "engine_far") > 0.3
    assert min(r.at("rel_err", "stale")) > 0.05 and min(r.at("rel_err", "stale_engine")) > 0.05


def test_sequence_weight_trades_variance(tables):
    token, sequence = trainer_row(tables), trainer_row(tables, kl_importance_weight="sequence")
    assert sequence.mean_variance("on_policy") == pytest.approx(token.mean_variance("on_policy"), rel=1e-9)
    assert sequence.mean_variance("engine_far") > 5 * token.mean_variance("engine_far")


def test_trainer_sequence_weight_is_the_decomposed_exact_form(tables):
    """The trainer computes pi_theta(y)/q(y) from q directly; the KL table's exact row as the product of the
    policy's sequence weight and TRL's uncapped sequence correction: the same per-sample gradients (mean and
    variance) in every scenario."""
    trainer, decomposed = trainer_row(tables, kl_importance_weight="sequence"), row(tables.kl_rows, **EXACT)
    for s in eg.OFFPOLICY_SCENARIOS:
        assert trainer.at("rel_err", s) == pytest.approx(decomposed.at("rel_err", s), rel=1e-6, abs=1e-12)
        assert trainer.at("variance", s) == pytest.approx(decomposed.at("variance", s), rel=1e-9)


def test_per_state_forms_get_their_on_policy_update_with_the_sequence_weight(tables):
    for fields in (dict(kl_reward_scope="token"), dict(kl_placement="loss", kl_estimator="k2"),
                   dict(kl_placement="loss", kl_estimator="full")):
        sequence = trainer_row(tables, kl_importance_weight="sequence", **fields)
        assert all(sequence.verdict(s) == "on-policy" for s in ("on_policy", *COVERED)), fields
        token = trainer_row(tables, **fields)
        assert token.verdict("on_policy") == "on-policy" and min(token.at("gap", "stale_engine")) > 0.01, fields


def test_kl_sequence_form_is_the_trainers_only():
    for bad in (dict(correction="sequence_mask"), dict(penalty_from="old"), dict(ppo_clip=0.2),
                dict(scope="sequence_prenorm")):
        with pytest.raises(ValueError, match="kl_importance_weight='sequence'"):
            Form(ratio="kl_sequence", **{"penalty_from": "current", **bad})
    Form("loss", "k2", "-", "kl_sequence")

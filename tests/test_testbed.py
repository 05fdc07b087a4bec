"""The testbed (trl_kl.testbed) and its ablation (benchmarks/testbed_ablation.py).

The language, the proxy reward and the gold metric are checked against hand-computed values; the built pi_ref
against the chain it was fitted to (per-token KL, entropy); and a quick on-policy ablation (4 variants x 2 seeds x
40 steps, CI) against what theory guarantees at that size: k1 as a loss has an expected gradient of zero
(docs/theory.md#placement), so it drifts like no KL at all, far from the sound forms (k1 in the reward with
return-to-go, k2 as a loss); and with no KL the proxy is over-optimised, the gold metric falling below where it
started. The reward of the sound forms is not asserted (its differences at this size are within the seeds).
"""

import sys
from pathlib import Path

import pytest
import torch

from trl_kl import testbed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kl_ablation  # noqa: E402
import testbed_ablation  # noqa: E402


@pytest.fixture(scope="module")
def testbed_path():
    """pi_ref, built once into the cache (about 35 s on 2 cores when the cache is fresh)."""
    return testbed.testbed_model_path()


def test_language_is_fixed_by_its_seed_sparse_and_keywords_are_rare():
    matrix = testbed.transition_matrix()
    assert torch.equal(matrix, testbed.transition_matrix(testbed.LANGUAGE_SEED))
    assert not torch.equal(matrix, testbed.transition_matrix(testbed.LANGUAGE_SEED + 1))
    assert torch.allclose(matrix.sum(-1), torch.ones(len(testbed.LETTERS), dtype=torch.float64))
    keywords = [testbed.LETTERS.index(k) for k in testbed.KEYWORDS]
    assert (matrix[:, keywords] > 0).sum() == testbed.KEYWORD_HOSTS  # a keyword follows only its hosts
    assert (matrix[keywords][:, keywords] == 0).all()  # never two keywords in a row
    assert ((matrix > 0).sum(-1) <= testbed.SUCCESSORS + 1).all()
    assert 1.2 < testbed.entropy_rate(matrix) < 1.6  # ~1.39 nats per token
    assert testbed.stationary(matrix)[keywords].sum() < 0.03
    assert testbed.sample_text(3, 10, seed=5) == testbed.sample_text(3, 10, seed=5)
    assert testbed.make_dataset(4, seed=0)["prompt"] != testbed.make_dataset(4, seed=1)["prompt"]


def test_proxy_and_gold_by_hand():
    matrix = testbed.transition_matrix()
    letters = testbed.LETTERS
    host, keyword = next((a, b) for a in range(len(letters)) for b in range(len(letters))
                         if letters[b] in testbed.KEYWORDS and matrix[a, b] > 0)
    after = int(matrix[keyword].nonzero()[0])
    forbidden = int((matrix[host] == 0).nonzero()[0])
    h, k, a, f = letters[host], letters[keyword], letters[after], letters[forbidden]
    n = testbed.COMPLETION_LENGTH
    # grammatical: host -> keyword -> a successor; the prompt's last letter counts for the first transition
    assert testbed.proxy_reward(["ab" + h], [k + a]) == [1 / n]
    assert testbed.gold_score(["ab" + h], [k + a]) == [1 / n]
    # the same keyword after a letter that forbids it: proxy unchanged, gold -1 (an error, no keyword credit)
    non_host = next(c for c in range(len(letters)) if matrix[c, keyword] == 0)
    assert testbed.proxy_reward([letters[non_host]], [k]) == [1 / n]
    assert testbed.gold_score([letters[non_host]], [k]) == [-1 / n]
    assert testbed.invalid_rate([h], [f + f]) == [(1 + (matrix[forbidden, forbidden] == 0).item()) / n]
    # two keywords in a row are never grammatical: all-keyword text has proxy 1 and gold about -1
    assert testbed.proxy_reward([h], [k * n]) == [1.0]
    assert testbed.gold_score([h], [k * n]) == [(1 - (n - 1)) / n]
    # the denominator is the fixed completion length, from the dataset column TRL passes (256 for the large size)
    assert testbed.make_dataset(2, completion_length=256)["completion_length"] == [256, 256]
    assert testbed.proxy_reward([h], [k], completion_length=[256]) == [1 / 256]


def test_reference_policy_matches_the_chain(testbed_path):
    """The built pi_ref is close to the chain per token and keeps its entropy (pi_ref is worth staying near)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(testbed_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(testbed_path)
    fit = testbed.fit_report(model, tokenizer)
    assert fit["kl_chain_model"] < 0.03, fit  # 0.012 at the default build
    assert fit["model_entropy"] >= 1.2 and abs(fit["model_entropy"] - fit["chain_entropy"]) < 0.15, fit
    assert fit["forbidden_mass"] < 0.03, fit
    # measured on the policy's own samples too: the evaluation's sequence entropy, per completion token
    groups = testbed_ablation.held_out(tokenizer, 16)
    stats = kl_ablation.evaluate_policy(model, model, tokenizer, groups, 2, testbed.COMPLETION_LENGTH, seed=0,
                                        score=testbed_ablation.score)
    assert stats["entropy"] / stats["length"] >= 1.0 and stats["length"] > 0.9 * testbed.COMPLETION_LENGTH
    assert stats["true_kl"] == 0.0 and stats["invalid"] < 0.05


def test_build_is_deterministic_per_seed():
    first, _ = testbed.build_testbed(seed=3, steps=3)
    again, _ = testbed.build_testbed(seed=3, steps=3)
    other, _ = testbed.build_testbed(seed=4, steps=3)
    pairs = list(zip(first.state_dict().values(), again.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_naive_arm_takes_the_penalty_from_the_current_policy():
    """The naive off-policy arm differs from eq. 39 only in whose log-probs form the penalty: with pi_old != pi_theta
    its per-token advantage is A - beta (log pi_theta - log pi_ref), by hand; eq. 39's would use log pi_old."""
    from types import SimpleNamespace

    from trl_kl.grpo import _MicroBatch

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]])
    old = logps - 0.3  # the rollout policy
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -2.0, -2.0]])
    inputs = {"advantages": torch.tensor([1.0, -1.0]), "old_per_token_logps": old, "ref_per_token_logps": ref,
              "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    micro = _MicroBatch(inputs=dict(inputs))
    trainer = SimpleNamespace(kl_coef=0.1)
    testbed_ablation.NaiveCurrentPolicyGRPOTrainer._policy_logps_ready(trainer, micro, SimpleNamespace(logps=logps))
    expected = inputs["advantages"][:, None] - 0.1 * (logps - ref) * inputs["completion_mask"]
    assert torch.allclose(micro.inputs["advantages"], expected)
    assert not torch.allclose(micro.inputs["advantages"], inputs["advantages"][:, None] - 0.1 * (old - ref) *
                              inputs["completion_mask"])
    assert inputs["advantages"].dim() == 1  # the rollout's own advantages are not overwritten (a shallow copy)
    variant = kl_ablation.BY_KEY["naive-current"]
    assert variant.overrides["kl_reward_scope"] == "token" and "naive-current" in testbed_ablation.OFF_POLICY


@pytest.mark.slow
def test_quick_ablation_on_the_testbed(testbed_path, tmp_path):
    out = testbed_ablation.main(["--quick", "--out", str(tmp_path)])
    runs = {(r["key"], r["seed"]): r["curves"] for r in out["results"]}
    seeds = sorted({seed for _, seed in runs})
    assert len(seeds) == 2
    final = {run: kl_ablation._final(curves["true_kl"]) for run, curves in runs.items()}
    for seed in seeds:
        sound = max(final[(k, seed)] for k in testbed_ablation.SOUND)
        unsound = min(final[(k, seed)] for k in testbed_ablation.UNSOUND)
        assert sound < 0.5 * unsound, f"seed {seed}: sound forms' true KL {sound:.1f} vs unsound {unsound:.1f}"
        # over-optimisation: without KL the proxy rises and the gold metric ends below where it started
        curves = runs[("no-kl", seed)]
        assert curves["proxy"][-1] > curves["proxy"][0] + 0.2
        assert curves["gold"][-1] < curves["gold"][0] - 0.1, curves["gold"]
        assert kl_ablation._final(runs[("k1-reward-rtg", seed)]["gold"]) > curves["gold"][-1] + 0.1
    for curves in runs.values():  # the Monte Carlo log-ratio sum checks the exact per-state KL
        assert abs(curves["mc_kl"][-1] - curves["true_kl"][-1]) < 1.0 + 0.15 * curves["true_kl"][-1]
    assert (tmp_path / "kl_ablation.md").exists() and (tmp_path / "kl_ablation_testbed_placement.png").exists()

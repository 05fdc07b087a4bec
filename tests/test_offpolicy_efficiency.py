"""The off-policy efficiency benchmark (benchmarks/offpolicy_efficiency.py): its analysis by hand, and a quick run
whose bookkeeping (generation calls, updates per call, common random numbers) is checked."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import offpolicy_efficiency as ope  # noqa: E402


def test_first_crossing_interpolates_between_evaluations():
    xs, ys = [0, 4, 8], [0.5, 0.6, 0.7]
    assert ope.first_crossing(xs, ys, 0.65) == pytest.approx(6.0)
    assert ope.first_crossing(xs, ys, 0.6) == pytest.approx(4.0)
    assert ope.first_crossing(xs, ys, 0.4) == 0  # already there at the start
    assert ope.first_crossing(xs, ys, 0.8) is None
    # the *first* crossing, not the last: a dip after reaching the target does not move it
    assert ope.first_crossing([0, 4, 8, 12], [0.5, 0.7, 0.5, 0.7], 0.6) == pytest.approx(2.0)


def test_break_even_rollout_share():
    # needing 1/1.54 of the calls with 4 updates each: 1.54 = s + 4 (1 - s)  =>  s = 2.46 / 3
    assert ope.break_even_rollout_share(1.54, 4) == pytest.approx(2.46 / 3)
    assert ope.break_even_rollout_share(2.0, 2) == 0.0  # twice fewer calls at twice the updates: always faster
    assert ope.break_even_rollout_share(1.0, 2) == 1.0  # no fewer calls: never faster
    assert ope.break_even_rollout_share(1.5, 1) is None and ope.break_even_rollout_share(None, 4) is None


def _run(key, seed, rewards, calls=(0, 4, 8)):
    return {"key": key, "seed": seed, "curve": {"calls": list(calls), "reward": list(rewards)}}


def test_paired_gain_is_the_mean_seed_difference_of_second_half_rewards():
    base = [_run("stock-on", s, [0.5, 0.6 + s / 100, 0.7]) for s in range(3)]
    arm = [_run("x", s, [0.5, 0.7 + s / 100, 0.8]) for s in range(3)]  # +0.1 at 4 and 8 calls (the 2nd half)
    gain = ope.paired_gain(base, arm)
    assert gain["mean"] == pytest.approx(0.1) and gain["low"] == pytest.approx(0.1) and gain["high"] == pytest.approx(0.1)
    assert ope.late_mean(base[0]) == pytest.approx((0.6 + 0.7) / 2)  # calls >= 4 of 8


@pytest.mark.slow
def test_quick_run_counts_generation_calls_and_updates(toy_path, tmp_path):
    out = ope.main(["--quick", "--out", str(tmp_path), "--workers", "1", "--seeds", "0"])
    results = {r["key"]: r for r in out["results"]}
    assert set(results) == set(ope.QUICK_ARMS)
    budget = out["budget"]
    for key, r in results.items():
        updates = ope.BY_KEY[key].num_iterations
        assert r["generation_calls"] == budget.calls  # counted on the trainer, not assumed
        assert r["optimizer_steps"] == budget.calls * updates
        assert r["curve"]["calls"] == list(range(0, budget.calls + 1, budget.eval_every))
        assert r["curve"]["steps"] == [c * updates for c in r["curve"]["calls"]]
        assert 0 < r["generation_seconds"] < r["train_seconds"]
    # common random numbers: every arm starts from the same policy and is evaluated with the same samples
    assert len({r["curve"]["reward"][0] for r in results.values()}) == 1
    # the off-policy arms really reuse rollouts: importance weights move away from 1
    assert results["trl_kl-off4"]["ess_mean"] < 1.0
    saved = json.loads((tmp_path / "offpolicy_efficiency.json").read_text())
    assert saved["budget"]["calls"] == budget.calls and (tmp_path / "offpolicy_efficiency.png").exists()
    assert not (tmp_path / "performance.md").exists()  # quick runs never touch the docs


def test_seed_ratios_pair_each_seed_and_skip_seeds_that_never_reach_the_target():
    base = [_run("stock-on", 0, [0.5, 0.6, 0.7]), _run("stock-on", 1, [0.5, 0.55, 0.6])]  # crosses 0.6 at 4, 8
    arm = [_run("x", 0, [0.5, 0.7, 0.7]), _run("x", 1, [0.5, 0.5, 0.5])]  # seed 0 at 2; seed 1 never
    assert ope.seed_ratios(base, arm, 0.6) == [pytest.approx(4 / 2)]

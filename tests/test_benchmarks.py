"""The measuring code of benchmarks/full_kl_memory.py and benchmarks/grpo_overhead.py, on small inputs: what
docs/performance.md reports must come out of them (closed forms where there are some)."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import full_kl_memory  # noqa: E402
import grpo_overhead  # noqa: E402


def test_full_kl_memory_rows_naive_closed_form_and_small_tile_within_target():
    args = argparse.Namespace(sizes=[64, 256], vocab=[1200], hidden=16, repeats=1, repeat_budget=1.0,
                              naive_max=10_000, device="cpu")
    rows = {(r["method"], r["n"]): r for r in full_kl_memory.measure(args)}
    for n in args.sizes:
        # the naive way holds 7 N x V float32 tensors at its peak (logits x2, log-softmaxes x2, p, log-ratio, product)
        assert rows[("naive", n)]["working_ratio"] == pytest.approx(7.0, abs=0.01)
        assert rows[(full_kl_memory.SMALL_TILE, n)]["working_ratio"] <= 1.2
        assert rows[(full_kl_memory.TRL_TILE, n)]["working_ratio"] > 10  # 32768-column buffers at V = 1200
    section = full_kl_memory.render(list(rows.values()), args, "cmd", 1.0, (0.0,))
    assert "target 1.2: met" in section and "**not met**" in section


@pytest.mark.slow
@pytest.mark.parametrize("regime", list(grpo_overhead.REGIMES))
def test_grpo_overhead_counts_the_same_forwards_for_stock_and_trl_kl(toy_path, tmp_path, regime):
    """The benchmark's claim 'trl_kl makes exactly the same model forwards as stock TRL', re-measured."""
    counts = {name: grpo_overhead.count_forwards(name, regime, toy_path, str(tmp_path)) for name in grpo_overhead.TRAINERS}
    assert counts["stock"] == counts["trl_kl"]
    assert counts["trl_kl"]["loss"][0] == counts["trl_kl"]["steps"]  # one policy forward per optimizer step
    if regime == "on-policy":
        assert counts["trl_kl"]["rollout"] == (0, 0)  # the k1 penalty reads the loss forward's log-probs

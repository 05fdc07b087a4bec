"""The measuring code of benchmarks/full_kl_memory.py and benchmarks/grpo_overhead.py, on small inputs: what
docs/performance.md reports must come out of them (closed forms where there are some); and benchmarks/_common.py,
the section writer, statistics and worker pool every benchmark shares."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import full_kl_memory  # noqa: E402
import grpo_overhead  # noqa: E402


def test_write_section_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "docs" / "performance.md"
    _common.write_section(page, "a", "first A")  # a new page: the header, then the block
    _common.write_section(page, "b", "first B\n")  # appended after A
    page.write_text(page.read_text() + "hand-written tail\n")
    _common.write_section(page, "a", "second A")
    text = page.read_text()
    assert text.startswith("# Performance\n")
    assert _common.read_section(page, "a") == "second A" and _common.read_section(page, "b") == "first B"
    assert text.index("second A") < text.index("first B") < text.index("hand-written tail")
    assert "first A" not in text and text.count("<!-- a:start -->") == 1
    _common.write_section(page, "a", "second A")
    assert page.read_text() == text  # idempotent
    assert _common.read_section(page, "missing") is None


def test_seed_statistics_closed_forms():
    assert _common.mean_std([1.0, 2.0, 3.0, None, float("nan")]) == (2.0, 1.0)  # n - 1 in the std; gaps ignored
    assert _common.mean_std([5.0]) == (5.0, 0.0)
    assert all(v != v for v in _common.mean_std([]))
    assert _common.median([3.0, 1.0, 2.0]) == 2.0 and _common.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert _common.median([None]) is None
    low, high = _common.bootstrap_ci(lambda xs: sum(xs) / len(xs), [1.0, 2.0, 3.0, 4.0], resamples=500)
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert _common.bootstrap_ci(lambda xs: sum(xs) / len(xs), [2.0] * 5, resamples=50) == (2.0, 2.0)


def test_run_parallel_keeps_the_payload_order():
    assert _common.run_parallel(abs, [-3, 2, -1], workers=1) == [3, 2, 1]


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

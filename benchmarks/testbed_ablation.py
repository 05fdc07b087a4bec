"""The KL ablation on the testbed (``trl_kl.testbed``): long completions, a hackable proxy reward, a gold metric.

    python benchmarks/testbed_ablation.py            # full grid: docs/kl_ablation.md (testbed section) + PNGs + JSON
    python benchmarks/testbed_ablation.py --quick    # CI smoke test: 4 variants, 2 seeds, on-policy, short budget
    python benchmarks/testbed_ablation.py --plot-only

Same machinery as ``benchmarks/kl_ablation.py`` (its variants, regimes, worker pool and exact-KL evaluation), on
the testbed: pi_ref is a 2-layer Qwen2 fitted to a 24-letter Markov chain, prompts are 4 letters, completions 48
tokens, the training reward is the grammar-blind *proxy* (keyword share), and the held-out evaluation also
measures the *gold* metric (grammatical keywords - grammar errors, per token) the policy never sees. Per
evaluation: ``proxy``, ``gold``, ``invalid`` (forbidden transitions per token), ``true_kl`` (exact per-state
KL summed along sampled completions), ``mc_kl`` (its Monte Carlo check), ``entropy`` (sequence entropy).

The grid: every estimator x placement (the unsound ones with ``allow_unsound_kl=True``), k1's three reward
scopes, trl_kl's emulation of TRL's KL (``trl-default``) and stock ``trl.GRPOTrainer`` itself (``stock-trl``),
no KL, and ``naive-current`` (k1 in the reward per token, the penalty computed from the *current* policy's
log-probs instead of the sampling policy's: what eq. 39's treatment is compared with); on-policy, and the main
variants also mildly (``off2``: 2 updates per rollout) and strongly (``off16``: ``num_iterations=4``,
``steps_per_generation=4``, 16 updates per rollout) off-policy. Seeds 0, 1, 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import kl_ablation  # noqa: E402
from _common import command_line, mean_std  # noqa: E402

from trl_kl import GRPOTrainer, kl, testbed  # noqa: E402

# --------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------


def held_out(tokenizer, n_prompts: int):
    """``n_prompts`` held-out prompts (seed 999, disjoint in seed from training's), one group: the targets are the
    prompts themselves (the gold metric reads the prompt's last letter)."""
    import torch

    prompts = list(testbed.make_dataset(n_prompts, seed=999)["prompt"])
    return [(torch.tensor(tokenizer(prompts, add_special_tokens=False).input_ids), prompts)]


def score(completions: list[str], prompts: list[str], size: str = "small") -> dict[str, float]:
    """Held-out sums: ``proxy`` (the training reward), ``gold``, ``invalid`` (forbidden transitions per token)."""
    lengths = [testbed.SIZES[size].completion_length] * len(completions)
    return {
        "proxy": sum(testbed.proxy_reward(prompts, completions, lengths)),
        "gold": sum(testbed.gold_score(prompts, completions, lengths)),
        "invalid": sum(testbed.invalid_rate(prompts, completions, lengths)),
    }


def train(seed: int, size: str = "small"):
    """The proxy reward and 4096 training prompts drawn with ``seed``."""
    return [testbed.proxy_reward], testbed.make_dataset(4096, seed, testbed.SIZES[size].completion_length)


def _task(name: str, size: str) -> kl_ablation.Task:
    return kl_ablation.Task(name, partial(testbed.testbed_model_path, size=size), held_out, partial(score, size=size),
                            partial(train, size=size), testbed.SIZES[size].completion_length,
                            ("proxy", "gold", "invalid"))


TESTBED = _task("testbed", "small")
TASKS = {"testbed": TESTBED, "testbed-large": _task("testbed-large", "large")}
"""``--size large`` (a GPU run): pi_ref of ~100M parameters, 256-token completions."""


class NaiveCurrentPolicyGRPOTrainer(GRPOTrainer):
    """k1 in the per-token reward (scope ``token``) with the penalty log pi_theta - log pi_ref taken from the
    *current* policy's detached log-probs instead of pi_old's (the rollout policy's): the naive off-policy form that
    eq. 39's treatment replaces (docs/theory.md#off-policy). Identical to eq. 39 on-policy. Benchmark only."""

    def _policy_logps_ready(self, micro, forward) -> None:
        micro.logps = forward.logps
        micro.penalty = kl.reward_penalty("k1", micro.logps.detach(), micro.inputs["ref_per_token_logps"])
        micro.inputs["advantages"] = kl.kl_shaped_advantages(
            micro.inputs["advantages"], micro.penalty, micro.mask, self.kl_coef, "token"
        )


# --------------------------------------------------------------------------------------------------------
# The grid and its budget
# --------------------------------------------------------------------------------------------------------

ON_POLICY = [v.key for v in kl_ablation.VARIANTS if v.key != "k1-reward-rtg-b0.04"] + ["stock-trl"]
"""On-policy: every estimator x placement, k1's scopes, TRL's KL (emulated and stock), no KL."""
OFF_POLICY = ["k1-reward-rtg", "k1-reward-token", "naive-current", "k2-loss", "k3-loss", "k1-loss", "k2-reward",
              "stock-trl"]
"""Also run in both off-policy regimes (``naive-current`` only there: on-policy it is ``k1-reward-token``)."""
OFF_REGIMES = ["off2", "off16", "off16long"]
LONG_OFF = ["k1-reward-rtg", "k1-reward-token", "naive-current", "k2-loss", "stock-trl"]
"""Strongly off-policy for 3x the steps (``off16long``), far enough from pi_ref for the naive form to differ."""
QUICK = ["k1-reward-rtg", "k2-loss", "k1-loss", "no-kl"]
SOUND, UNSOUND = ("k1-reward-rtg", "k2-loss"), ("k1-loss", "no-kl")
"""The quick check: k1 as a loss has an expected gradient of zero (docs/theory.md#placement), like no KL at all."""

FULL = kl_ablation.Budget(steps=120, eval_every=20, beta=0.1, learning_rate=3e-4, batch=96, group=6,
                          eval_prompts=64, eval_samples=2, task="testbed")
QUICK_BUDGET = kl_ablation.Budget(**{**FULL.__dict__, "steps": 40})
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
"""Student t quantiles (0.975) by degrees of freedom, for 95% intervals over seeds."""
METRICS = ("proxy", "gold", "invalid", "true_kl", "mc_kl", "entropy")


def jobs_for(variants: list[str], regimes: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """The grid's runs: each variant in each regime it belongs to (on-policy: ``ON_POLICY``; off: ``OFF_POLICY``)."""
    members = {"on": ON_POLICY, "off2": OFF_POLICY, "off16": OFF_POLICY, "off16long": LONG_OFF}
    regimes_for = {key: [r for r in regimes if key in members[r]] for key in variants}
    # longest runs first, so the two workers finish together
    return sorted(kl_ablation.grid(variants, regimes_for, seeds), key=lambda job: -kl_ablation.REGIME_STEPS[job[1]])


# --------------------------------------------------------------------------------------------------------
# Table and plots
# --------------------------------------------------------------------------------------------------------


def ci(pair: tuple[float, float], n: int) -> float:
    """Half-width of the 95% t interval of a mean over ``n`` seeds from (mean, std)."""
    return T95.get(n - 1, 1.96) * pair[1] / math.sqrt(n) if n > 1 else float("nan")


def table(results: list[dict], budget) -> str:
    summary = kl_ablation.summarize(results, METRICS)
    start = next(iter(summary.values()))

    def fmt(entry, metric, digits=3):
        mean = entry[metric][0]
        return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {ci(entry[metric], len(entry['runs'])):.{digits}f}"

    lines = [
        f"Start (pi_ref, before RL): proxy {start['proxy_start'][0]:.3f}, gold {start['gold_start'][0]:.3f}, "
        f"forbidden transitions per token {start['invalid_start'][0]:.3f}, sequence entropy "
        f"{start['entropy_start'][0]:.1f} nats over {kl_ablation.task(budget.task).max_new_tokens} tokens, "
        "true KL 0.",
        "",
        "| variant | verdict | regime | proxy | gold | gold peak | forbidden / token | true seq. KL | MC check | "
        "seq. entropy | IS ESS: mean (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {key: i for i, key in enumerate(ON_POLICY + ["naive-current"])}
    regimes = ["on", *OFF_REGIMES]
    for (key, regime), s in sorted(summary.items(), key=lambda kv: (regimes.index(kv[0][1]), order[kv[0][0]])):
        v = kl_ablation.BY_KEY[key]
        peaks = [max(r["curves"]["gold"]) for r in s["runs"]]
        peak = mean_std(peaks)
        ess = "1 (on-policy)" if regime == "on" else f"{s['ess'][0]:.2f} (min {s['ess_min']:.2f})"
        lines.append(
            f"| `{key}` ({v.label}) | {v.verdict} | {kl_ablation.REGIME_LABELS[regime]} | {fmt(s, 'proxy')} | "
            f"{fmt(s, 'gold')} | {peak[0]:.3f} ± {ci(peak, len(peaks)):.3f} | {fmt(s, 'invalid')} | "
            f"{fmt(s, 'true_kl', 1)} | {fmt(s, 'mc_kl', 1)} | {fmt(s, 'entropy', 1)} | {ess} |"
        )
    seeds = start["seeds"]
    lines += [
        "",
        f"Final values: mean of the last two evaluations (steps {budget.steps - budget.eval_every} and "
        f"{budget.steps}; x3 for 3x steps) of each run, then mean ± 95% t-interval half-width over seeds {seeds}. "
        "Gold peak: each run's best evaluation. Held-out set: "
        f"{budget.eval_prompts} prompts x {budget.eval_samples} samples at T=1, "
        f"{kl_ablation.task(budget.task).max_new_tokens} tokens. "
        "Off-policy x2: `num_iterations=2`; x16: `num_iterations=4, steps_per_generation=4`, same optimizer steps "
        "(so 1/2 and 1/16 of the generations). IS ESS: the trainer's `is/ess` averaged over a run's steps, and its "
        "minimum over all steps and seeds (stock TRL logs none).",
    ]
    return "\n".join(lines)


COLORS = {**kl_ablation.COLORS, "stock-trl": "dimgray", "naive-current": "magenta"}
FIGURES = {
    "placement": ("Estimator x placement, on-policy",
                  [(k, "on") for k in ("k1-reward-rtg", "k2-loss", "k1-loss", "k2-reward", "k3-reward", "k3-loss",
                                       "stock-trl", "no-kl")]),
    "scope": ("k1 in the reward: scope; k3_clip; on-policy",
              [(k, "on") for k in ("k1-reward-rtg", "k1-reward-token", "k1-reward-seq", "k3clip-reward",
                                   "k3clip-loss", "trl-default", "k2-loss")]),
    "offpolicy": ("Strongly off-policy (16 updates per rollout, solid) vs on-policy (dashed)",
                  [(k, r) for k in ("k1-reward-rtg", "k1-reward-token", "naive-current", "k2-loss", "k3-loss",
                                    "stock-trl") for r in ("on", "off16")]),
    "offpolicy_long": ("Strongly off-policy for 3x the steps (solid) vs on-policy (dashed)",
                       [(k, r) for k in LONG_OFF for r in ("on", "off16long")]),
}
PANELS = (("proxy", "proxy reward", "keyword share"),
          ("gold", "gold metric", "grammatical keywords - errors, per token"),
          ("true_kl", "true sequence KL", "KL(pi(y|x) || pi_ref(y|x)), nats (symlog)"),
          ("entropy", "policy entropy", "sequence entropy, nats"))
MARKER = "testbed-table"


def plot(results: list[dict], out: Path, budget, names: list[str] | None = None) -> list[Path]:
    """``kl_ablation.plot`` with the testbed's figures and panels: ``kl_ablation_testbed_<name>.png``."""
    setting = (f"GRPO on the testbed ({kl_ablation.task(budget.task).max_new_tokens}-token completions), lr "
               f"{budget.learning_rate}")
    return kl_ablation.plot(results, out, budget, names, FIGURES, PANELS, COLORS, "kl_ablation_testbed", setting,
                            log_kl=True)


def write_table(md_path: Path, text: str, command: str) -> None:
    """The table between this benchmark's markers in ``md_path`` (appended when missing)."""
    kl_ablation.write_table(md_path, text, command, MARKER, "# KL ablation\n")


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 4 variants on-policy, 2 seeds, 40 steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--variants", nargs="+", default=None, choices=ON_POLICY + ["naive-current"])
    parser.add_argument("--regimes", nargs="+", default=None, choices=["on", *OFF_REGIMES])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="default docs (quick: outputs/testbed_ablation_quick)")
    parser.add_argument("--plot-only", action="store_true", help="redraw from <out>/kl_ablation_testbed.json")
    parser.add_argument("--size", choices=list(testbed.SIZES), default="small",
                        help="large: a ~100M-parameter pi_ref and 256-token completions (use with --device cuda)")
    parser.add_argument("--device", default="cpu", help="cuda: train and evaluate on the GPU")
    parser.add_argument("--add", action="store_true",
                        help="run only the selected jobs and merge them into <out>/kl_ablation_testbed.json")
    args = parser.parse_args(argv)

    budget = QUICK_BUDGET if args.quick else FULL
    budget = kl_ablation.Budget(**{**budget.__dict__, "steps": args.steps or budget.steps, "device": args.device,
                                   "task": "testbed" if args.size == "small" else f"testbed-{args.size}"})
    out = Path(args.out or ("outputs/testbed_ablation_quick" if args.quick else ROOT / "docs"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "kl_ablation_testbed.json"
    command = command_line("testbed_ablation.py", argv)
    if args.plot_only:
        saved = json.loads(json_path.read_text())
        results, budget, command = saved["results"], kl_ablation.Budget(**saved["budget"]), saved["command"]
    else:
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
        variants = args.variants or (QUICK if args.quick else ON_POLICY + ["naive-current"])
        regimes = args.regimes or (["on"] if args.quick else ["on", *OFF_REGIMES])
        jobs = jobs_for(variants, regimes, seeds)
        print(f"{len(jobs)} runs, seeds {seeds}, {budget.steps} steps, {args.workers} workers", flush=True)
        workdir = os.environ.get("TMPDIR", "/tmp") + f"/testbed_ablation_{os.getpid()}"
        start = time.time()
        try:
            results = kl_ablation.run_grid(jobs, budget, args.workers, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.time() - start
        print(f"done in {elapsed:.0f} s", flush=True)
        if args.add:  # replace the same (variant, regime, seed) runs of the saved grid, keep the rest
            saved = json.loads(json_path.read_text())
            new = {(r["key"], r["regime"], r["seed"]) for r in results}
            results = [r for r in saved["results"] if (r["key"], r["regime"], r["seed"]) not in new] + results
            command, elapsed = f"{saved['command']}; {command}", saved["seconds"] + elapsed
        json_path.write_text(json.dumps({"budget": budget.__dict__, "command": command, "seconds": elapsed,
                                         "results": results}))
    text = table(results, budget)
    print(text)
    written = plot(results, out, budget, names=["placement"] if args.quick else None)
    write_table(out / "kl_ablation.md", text, command)
    print("wrote", json_path, out / "kl_ablation.md", *written)
    return {"results": results, "budget": budget}


if __name__ == "__main__":
    main()

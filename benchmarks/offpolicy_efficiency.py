"""Off-policy GRPO's sample efficiency: held-out reward per generation call and per second of training.

    python benchmarks/offpolicy_efficiency.py                 # 5 arms x 5 seeds: docs/performance.md + PNG + JSON (~6 min)
    python benchmarks/offpolicy_efficiency.py --quick         # 3 arms x 2 seeds, short budget (smoke test, ~1 min)
    python benchmarks/offpolicy_efficiency.py --plot-only     # redraw the table and plot from the JSON

The paper's case for off-policy GRPO (section 4; docs/theory.md#off-policy) is cost: each batch of completions, the expensive
part of RLHF, feeds several updates (``num_iterations`` > 1), with importance sampling and the PPO-2 clip
correcting for the staleness and the KL moved into the per-token reward (eq. 39) so that it is estimated under
the right distribution. This benchmark measures that on the offline toy task (``trl_kl.toy``: a char-level
2-layer Qwen2 warm-started on adding two numbers), every arm with the same generation batch (16 prompts x
group 6 = 96 completions per call), learning rate, beta, loss type (``dapo``, TRL's default) and seed:

* ``stock-on``: stock ``trl.GRPOTrainer``, on-policy (``num_iterations=1``), KL as k3 in the loss (TRL's only
  option, with its importance ratio): the baseline;
* ``trl_kl-on``: ``trl_kl.GRPOTrainer`` defaults (k1 in the per-token reward, return-to-go), on-policy: the
  control that separates the KL placement from sample reuse;
* ``trl_kl-off2`` / ``trl_kl-off4``: trl_kl, each generation reused for 2 / 4 optimizer steps
  (``num_iterations`` = 2 / 4, ``steps_per_generation=1``): the paper's off-policy GRPO;
* ``stock-off4``: stock TRL with the same reuse (its k3 loss, taken under the sampling policy's tokens).

Each arm runs for the same number of *generation calls* (``--calls``; one call = one
``_generate_and_score_completions``, counted on the trainer), so an off-policy arm makes ``num_iterations`` times
as many optimizer steps. Every ``--eval-every`` calls, after the last update that used the latest generation,
the policy is evaluated on a fixed held-out prompt set (the toy's test split, ``kl_ablation.evaluate_policy``:
completions sampled at T=1, common random numbers across arms at equal call counts): ``reward`` = correctness
+ closeness (the training reward, in [0, 2]) and the exact sequence KL to the reference. Training wall time
is accumulated with the evaluations left out.

Reported (docs/performance.md, between the ``offpolicy_efficiency`` markers): the held-out reward at equal
generation calls, and **calls to reach the target** = the seed-mean reward stock on-policy has at its last
evaluation (averaged over its last two, to damp the sampling noise): the first evaluation at which each
arm's seed-mean curve reaches it, linearly interpolated between evaluations; the ratio stock-on calls / arm
calls (> 1: fewer generations needed). The same for training seconds. Per-seed crossings (each seed's own
curve against the same target) give the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import kl_ablation  # noqa: E402  (held-out evaluation, reference model, number formatting)
from _common import command_line, machine_line, mean, mean_std, median, run_parallel, write_section  # noqa: E402

MARKER = "offpolicy_efficiency"


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    stock: bool  # trl.GRPOTrainer (k3 loss) instead of trl_kl.GRPOTrainer (k1 in the reward)
    num_iterations: int


ARMS = [
    Arm("stock-on", "stock TRL, on-policy (k3 loss)", True, 1),
    Arm("trl_kl-on", "trl_kl, on-policy (k1 in reward)", False, 1),
    Arm("trl_kl-off2", "trl_kl, off-policy, 2 updates/generation", False, 2),
    Arm("trl_kl-off4", "trl_kl, off-policy, 4 updates/generation", False, 4),
    Arm("stock-off4", "stock TRL, 4 updates/generation (k3 loss)", True, 4),
    Arm("trl_kl-off8", "trl_kl, off-policy, 8 updates/generation", False, 8),
]
BY_KEY = {a.key: a for a in ARMS}
BASELINE = "stock-on"
TOY_ARMS = [a.key for a in ARMS if a.key != "trl_kl-off8"]
QUICK_ARMS = ["stock-on", "trl_kl-off2", "trl_kl-off4"]


@dataclass
class Budget:
    calls: int = 64  # generation calls per arm
    eval_every: int = 4  # calls between evaluations
    beta: float = 0.04  # the paper's
    learning_rate: float = 1e-4  # at 3e-4 extra updates per generation mostly add drift on this toy
    prompts: int = 16  # prompts per generation call
    group: int = 6  # completions per prompt (the paper's group size)
    eval_prompts: int = 512
    eval_samples: int = 4
    task: str = "toy"  # or "testbed" (trl_kl.testbed, through benchmarks/testbed_ablation.py)
    target: str = "reward"  # the held-out metric the arms race to (the testbed: "gold")


FULL = Budget()
QUICK_BUDGET = Budget(calls=8, eval_every=4, eval_prompts=128, eval_samples=2)
TESTBED = Budget(calls=24, eval_every=4, beta=0.1, learning_rate=3e-4, eval_prompts=64, eval_samples=2,
                 task="testbed", target="gold")
"""The testbed (``--testbed``): 24 calls, while stock on-policy's gold score is still rising (it levels off at
about 40 steps, docs/kl_ablation.md#testbed): past its plateau, "calls to reach its final score" would measure
where a flat noisy curve first touches its own mean."""


def config_for(arm: Arm, seed: int, budget: Budget, output_dir: str):
    """The arm's GRPOConfig: trl.GRPOConfig for the stock arms (TRL's KL: k3 loss x ratio), trl_kl's otherwise."""
    import trl

    import trl_kl

    config_cls = trl.GRPOConfig if arm.stock else trl_kl.GRPOConfig
    return config_cls(**kl_ablation.toy_run_settings(
        max_completion_length=kl_ablation.task(budget.task).max_new_tokens,
        output_dir=output_dir,
        max_steps=budget.calls * arm.num_iterations,
        num_iterations=arm.num_iterations,
        steps_per_generation=1,
        seed=seed,
        learning_rate=budget.learning_rate,
        per_device_train_batch_size=budget.prompts * budget.group,
        num_generations=budget.group,
        beta=budget.beta,
    ))


def run_one(key: str, seed: int, budget: Budget, workdir: str) -> dict:
    """Train one arm for ``budget.calls`` generation calls; its held-out curve against calls and seconds."""
    import trl
    from transformers import TrainerCallback

    import trl_kl

    arm = BY_KEY[key]
    task = kl_ablation.task(budget.task)
    _, ref, tokenizer = kl_ablation._reference(budget.task)
    groups = task.held_out(tokenizer, budget.eval_prompts)
    metrics = dict.fromkeys(("reward", *task.metrics, "true_kl"))  # "reward": the target metric
    curve: dict[str, list] = {name: [] for name in ("calls", "steps", "seconds", *metrics)}
    clock = {"train": 0.0, "since": 0.0, "generate": 0.0}
    calls = {"n": 0}
    ess: list[float] = []

    def evaluate(model, step: int):
        n = calls["n"]
        # common random numbers: every arm samples its evaluation with the same seed at the same call count
        stats = kl_ablation.evaluate_policy(model, ref, tokenizer, groups, budget.eval_samples, task.max_new_tokens,
                                            seed=10_000 * seed + n, score=task.score)
        stats["reward"] = stats[budget.target]
        for name, value in (("calls", n), ("steps", step), ("seconds", round(clock["train"], 3))):
            curve[name].append(value)
        for name in metrics:
            curve[name].append(kl_ablation._compact(stats[name], 5))

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["since"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            clock["train"] += time.perf_counter() - clock["since"]
            # evaluate once the latest generation has fed all its updates, every eval_every calls
            if state.global_step % arm.num_iterations == 0 and calls["n"] % budget.eval_every == 0:
                evaluate(model, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and logs.get("is/ess") is not None:
                ess.append(logs["is/ess"])

    trainer_cls = trl.GRPOTrainer if arm.stock else trl_kl.GRPOTrainer
    args = config_for(arm, seed, budget, os.path.join(workdir, f"{key}-{seed}"))
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = kl_ablation.toy_trainer(trainer_cls, args, Recorder(), budget.task)
        generate = trainer._generate_and_score_completions

        def counted(*a, **kw):
            calls["n"] += 1
            start = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                clock["generate"] += time.perf_counter() - start

        trainer._generate_and_score_completions = counted
        evaluate(trainer.model, 0)
        trainer.train()
    if calls["n"] != budget.calls:
        raise RuntimeError(f"{key} seed {seed}: {calls['n']} generation calls, expected {budget.calls}")
    result = {"key": key, "seed": seed, "curve": curve, "generation_calls": calls["n"],
              "optimizer_steps": args.max_steps, "train_seconds": round(clock["train"], 2),
              "generation_seconds": round(clock["generate"], 2),
              "ess_mean": kl_ablation._compact(sum(ess) / len(ess), 5) if ess else None,
              "seconds": round(time.time() - start, 1)}
    del trainer
    return result


def _run_job(job):
    key, seed, budget, workdir = job
    result = run_one(key, seed, budget, workdir)
    c = result["curve"]
    print(f"  {key:12s} seed {seed}: reward {c['reward'][0]:.3f} -> {c['reward'][-1]:.3f} after "
          f"{result['generation_calls']} calls / {result['optimizer_steps']} steps, {result['train_seconds']:.1f} s "
          f"training, true KL {c['true_kl'][-1]:.3f}, ESS {result['ess_mean'] or float('nan'):.3f}", flush=True)
    return result


def run_all(jobs: list[tuple[str, int]], budget: Budget, workers: int, workdir: str) -> list[dict]:
    """Run the jobs in ``workers`` processes (one torch thread each); results in job order."""
    return run_parallel(_run_job, [(key, seed, budget, workdir) for key, seed in jobs], workers)


# --------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------


def first_crossing(xs: list[float], ys: list[float], target: float) -> float | None:
    """The smallest x at which the piecewise-linear curve (xs, ys) reaches ``target`` (None if it never does)."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y >= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (target - y0) * (x - x0) / (y - y0)
    return None


def summarize(results: list[dict]) -> dict:
    """Seed-mean curves, the target reward and each arm's calls / seconds to reach it."""
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["key"], []).append(r)
    arms = {}
    for key, runs in by_arm.items():
        calls = runs[0]["curve"]["calls"]
        if any(r["curve"]["calls"] != calls for r in runs):
            raise ValueError(f"{key}: runs evaluated at different call counts")
        arms[key] = {
            "runs": runs,
            "calls": calls,
            "reward": [mean(vals) for vals in zip(*(r["curve"]["reward"] for r in runs), strict=True)],
            "reward_std": [mean_std(vals)[1] for vals in zip(*(r["curve"]["reward"] for r in runs), strict=True)],
            "true_kl": [mean(vals) for vals in zip(*(r["curve"]["true_kl"] for r in runs), strict=True)],
            "seconds": [mean(vals) for vals in zip(*(r["curve"]["seconds"] for r in runs), strict=True)],
            "ess": mean([r["ess_mean"] for r in runs]),
            "rollout_share": mean([r["generation_seconds"] / r["train_seconds"] for r in runs]),
            "seeds": len(runs),
        }
    base = arms[BASELINE]["reward"]
    target = mean(base[-2:])
    for entry in arms.values():
        entry["calls_to_target"] = first_crossing(entry["calls"], entry["reward"], target)
        entry["seconds_to_target"] = first_crossing(entry["seconds"], entry["reward"], target)
        entry["seed_calls_to_target"] = [first_crossing(r["curve"]["calls"], r["curve"]["reward"], target)
                                         for r in entry["runs"]]
        entry["seed_seconds_to_target"] = [first_crossing(r["curve"]["seconds"], r["curve"]["reward"], target)
                                           for r in entry["runs"]]
    base_calls, base_seconds = arms[BASELINE]["calls_to_target"], arms[BASELINE]["seconds_to_target"]
    base_share = arms[BASELINE]["rollout_share"]
    for key, entry in arms.items():
        c, s = entry["calls_to_target"], entry["seconds_to_target"]
        entry["call_ratio"] = base_calls / c if c and base_calls else None
        entry["seconds_ratio"] = base_seconds / s if s and base_seconds else None
        entry["break_even_share"] = break_even_rollout_share(entry["call_ratio"], BY_KEY[key].num_iterations)
        entry["gain"] = paired_gain(arms[BASELINE]["runs"], entry["runs"])
        entry["seed_call_ratios"] = seed_ratios(arms[BASELINE]["runs"], entry["runs"], target)
    return {"target": target, "arms": arms, "baseline_rollout_share": base_share}


def seed_ratios(base_runs: list[dict], runs: list[dict], target: float) -> list[float]:
    """Per seed, the baseline's calls to ``target`` over the arm's (each seed's own curves; seeds where either
    never reaches the target are left out)."""
    base = {r["seed"]: first_crossing(r["curve"]["calls"], r["curve"]["reward"], target) for r in base_runs}
    ratios = []
    for r in runs:
        mine = first_crossing(r["curve"]["calls"], r["curve"]["reward"], target)
        if mine and base.get(r["seed"]):
            ratios.append(base[r["seed"]] / mine)
    return ratios


def late_mean(run: dict) -> float:
    """A run's mean held-out reward over its evaluations in the second half of the budget (calls >= half)."""
    calls, rewards = run["curve"]["calls"], run["curve"]["reward"]
    half = calls[-1] / 2
    return mean([r for c, r in zip(calls, rewards, strict=True) if c >= half])


def paired_gain(base_runs: list[dict], runs: list[dict], resamples: int = 2000) -> dict:
    """Mean over seeds of (arm - baseline) ``late_mean``, paired by seed, with a 95% percentile-bootstrap
    interval over seeds (fixed resampling seed: the table is reproducible)."""
    import random

    base = {r["seed"]: late_mean(r) for r in base_runs}
    diffs = [late_mean(r) - base[r["seed"]] for r in runs if r["seed"] in base]
    rng = random.Random(0)
    boot = sorted(mean([rng.choice(diffs) for _ in diffs]) for _ in range(resamples))
    return {"mean": mean(diffs), "low": boot[int(0.025 * resamples)], "high": boot[int(0.975 * resamples) - 1],
            "n": len(diffs)}


def break_even_rollout_share(call_ratio: float | None, updates_per_call: int) -> float | None:
    """The on-policy rollout share s (fraction of an on-policy step spent generating and scoring) at which an arm
    that needs ``1 / call_ratio`` as many generation calls, each followed by ``updates_per_call`` updates, would
    also take as much wall time: per call, rollout s plus updates_per_call x (1 - s), so equal time when
    ``call_ratio = s + updates_per_call (1 - s)``. Above it the arm is faster. A model, not a measurement."""
    if call_ratio is None or updates_per_call == 1:
        return None
    return min(max((updates_per_call - call_ratio) / (updates_per_call - 1), 0.0), 1.0)


def _f(x, digits=3, none="not reached"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


TARGET_WORDS = {  # how the table names the target metric: (short, long, plural, whose rollout share)
    "reward": ("reward", "held-out reward", "Rewards", "toy's measured share"),
    "gold": ("gold", "held-out gold score", "Gold scores", "measured share"),
}


def table(summary: dict, budget: Budget) -> str:
    short, long, plural, share = TARGET_WORDS[budget.target]
    arms = summary["arms"]
    order = [a.key for a in ARMS if a.key in arms]
    mid = len(arms[order[0]]["calls"]) // 2
    mid_calls = arms[order[0]]["calls"][mid]
    lines = [
        f"Target: {long} {summary['target']:.3f} (stock on-policy's seed mean at its last two evaluations, "
        f"{budget.calls - budget.eval_every} and {budget.calls} generation calls). {plural} are seed means +- std; "
        "'calls/seconds to target': first crossing of the seed-mean curve (linear between evaluations); "
        "per-seed crossings in brackets ('-': that seed never reached it); ratio = stock-on's / the arm's (> 1: "
        "fewer needed). 'Rollout share': the fraction of training time spent in `_generate_and_score_completions` "
        "(generation, rewards, reference and old log-probs).",
        "",
        f"| arm | seeds | optimizer steps | {short} at 0 calls | {short} at "
        f"{mid_calls} calls | {short} at {budget.calls} calls | true KL at {budget.calls} calls | mean ESS | "
        "calls to target [per seed] | call ratio | training s to target [per seed] | time ratio | rollout share of time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    gains = [
        "",
        f"Less sensitive to where one noisy curve crosses the target: each arm's mean {long} over the second "
        f"half of the budget (evaluations at >= {budget.calls // 2} calls) minus stock on-policy's, paired by seed, "
        "with a 95% bootstrap interval over seeds; the call ratio per seed (stock on-policy's crossing / the arm's, "
        "each seed's own curves, seeds where both reach the target); and, from the seed-mean call ratio, the on-policy rollout share above which the arm would "
        f"also win on wall time (model: a call costs its rollout plus num_iterations updates; {share} "
        f"{summary['baseline_rollout_share']:.2f}).",
        "",
        f"| arm | {short} gain vs stock on-policy, 2nd half [95% CI] | per-seed call ratio: median [min, max] (seeds) "
        "| break-even rollout share |",
        "|---|---|---|---:|",
    ]
    for key in order:
        e = arms[key]
        seeds_calls = ", ".join("-" if v is None else f"{v:.0f}" for v in e["seed_calls_to_target"])
        seeds_secs = ", ".join("-" if v is None else f"{v:.0f}" for v in e["seed_seconds_to_target"])
        lines.append(
            f"| {BY_KEY[key].label} | {e['seeds']} | {budget.calls * BY_KEY[key].num_iterations} | "
            f"{e['reward'][0]:.3f} | {e['reward'][mid]:.3f} +- {e['reward_std'][mid]:.3f} | "
            f"{e['reward'][-1]:.3f} +- {e['reward_std'][-1]:.3f} | {e['true_kl'][-1]:.3f} | "
            f"{_f(e['ess'], 3, 'n/a')} | {_f(e['calls_to_target'], 1)} [{seeds_calls}] | {_f(e['call_ratio'], 2, '-')} | "
            f"{_f(e['seconds_to_target'], 1)} [{seeds_secs}] | {_f(e['seconds_ratio'], 2, '-')} | "
            f"{e['rollout_share']:.2f} |"
        )
        if key != BASELINE:
            g = e["gain"]
            ratios = e["seed_call_ratios"]
            per_seed = (f"{median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] ({len(ratios)})" if ratios
                        else "-")
            gains.append(f"| {BY_KEY[key].label} | {g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] | {per_seed} | "
                         f"{_f(e['break_even_share'], 2, '-')} |")
    return "\n".join(lines + gains)


def plot(summary: dict, path: Path, what: str = "held-out reward", where: str = "the toy task") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in ARMS:
        if arm.key not in summary["arms"]:
            continue
        e = summary["arms"][arm.key]
        style = dict(label=arm.label, linestyle="--" if arm.stock else "-", marker="o", markersize=3)
        axes[0].plot(e["calls"], e["reward"], **style)
        axes[1].plot(e["seconds"], e["reward"], **style)
    for ax, xlabel in zip(axes, ("generation calls (96 completions each)", "training wall time (s, evaluation excluded)"),
                          strict=True):
        ax.axhline(summary["target"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{what} (seed mean)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Off-policy GRPO sample efficiency on {where} (dotted: target = stock on-policy's final score)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(summary: dict, budget: Budget, meta: dict, png_name: str) -> str:
    if budget.task == "testbed":
        return testbed_section(summary, budget, meta, png_name)
    arms = summary["arms"]
    best = max((k for k in arms if k != BASELINE and arms[k]["call_ratio"]), key=lambda k: arms[k]["call_ratio"],
               default=None)
    headline = ("" if best is None else
                f"**Result.** To reach stock on-policy's final held-out reward, {BY_KEY[best].label} needs "
                f"{arms[best]['calls_to_target']:.1f} generation calls instead of {arms[BASELINE]['calls_to_target']:.1f} "
                f"({arms[best]['call_ratio']:.2f}x fewer) and {_f(arms[best]['seconds_to_target'], 1)} s of training "
                f"instead of {_f(arms[BASELINE]['seconds_to_target'], 1)} s (time ratio "
                f"{_f(arms[best]['seconds_ratio'], 2, '-')}).\n\n")
    return (
        "## Off-policy GRPO: held-out reward per generation call (`benchmarks/offpolicy_efficiency.py`)\n\n"
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s, {meta['workers']} worker processes of one torch "
        f"thread each, so two runs share the machine's 2 cores; {meta['machine']}).\n\n"
        f"Setup: the toy task, {budget.calls} generation calls per arm ({budget.prompts} prompts x group {budget.group} "
        f"= {budget.prompts * budget.group} completions each), beta {budget.beta}, learning rate {budget.learning_rate} "
        "constant, loss_type dapo for every arm, bf16 off, max 4 completion tokens; held-out evaluation on "
        f"{budget.eval_prompts} test prompts x {budget.eval_samples} samples at T=1 every {budget.eval_every} calls "
        "(method in the script's docstring). Seeds: "
        f"{', '.join(str(s) for s in meta['seeds'])}.\n\n"
        f"{headline}"
        f"{table(summary, budget)}\n\n"
        f"![held-out reward vs generation calls and wall time]({png_name})\n"
    )


def testbed_section(summary: dict, budget: Budget, meta: dict, png_name: str) -> str:
    """The testbed's section: the same table with the gold score as the target metric, and the rollout share."""
    arms = summary["arms"]
    rows = table(summary, budget)
    best = max((k for k in arms if k != BASELINE and arms[k]["call_ratio"]), key=lambda k: arms[k]["call_ratio"],
               default=None)
    fastest = max((k for k in arms if k != BASELINE and arms[k]["seconds_ratio"]),
                  key=lambda k: arms[k]["seconds_ratio"], default=None)
    headline = "" if best is None else (
        f"**Result.** Fewest generation calls to stock on-policy's final gold score: {BY_KEY[best].label}, "
        f"{arms[best]['calls_to_target']:.1f} calls instead of {arms[BASELINE]['calls_to_target']:.1f} "
        f"({arms[best]['call_ratio']:.2f}x fewer; target >= 2x); least training time: "
        f"{BY_KEY[fastest].label if fastest else '-'}, time ratio "
        f"{_f(arms[fastest]['seconds_ratio'] if fastest else None, 2, '-')} (target >= 1.3x). Stock on-policy spends "
        f"{summary['baseline_rollout_share']:.0%} of its training time in rollouts.\n\n")
    return (
        "## Off-policy GRPO on the testbed: gold score per generation call "
        "(`benchmarks/offpolicy_efficiency.py --testbed`)\n\n"
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s, {meta['workers']} worker processes of one torch "
        f"thread each; {meta['machine']}).\n\n"
        f"Setup: the testbed (`trl_kl.testbed`, docs/kl_ablation.md#testbed): 48-token completions, proxy reward "
        f"(keyword share) for training, target = the held-out *gold* score; {budget.calls} generation calls per arm "
        f"({budget.prompts} prompts x group {budget.group} = {budget.prompts * budget.group} completions each), beta "
        f"{budget.beta}, learning rate {budget.learning_rate} constant, loss_type dapo; held-out evaluation on "
        f"{budget.eval_prompts} prompts x {budget.eval_samples} samples at T=1 every {budget.eval_every} calls. "
        f"Seeds: {', '.join(str(s) for s in meta['seeds'])}.\n\n"
        f"{headline}{rows}\n\n"
        f"![held-out gold score vs generation calls and wall time]({png_name})\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 arms, 2 seeds, 8 calls")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..4 (quick: 0 1)")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(BY_KEY))
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default docs; quick: outputs/...)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--testbed", action="store_true",
                        help="on trl_kl.testbed (48-token completions, target: gold score): docs/performance.md's "
                             "testbed section")
    args = parser.parse_args(argv)

    budget = TESTBED if args.testbed else QUICK_BUDGET if args.quick else FULL
    if args.testbed and args.quick:
        budget = Budget(**{**TESTBED.__dict__, "calls": 8, "eval_every": 4})
    stem = "offpolicy_efficiency_testbed" if args.testbed else "offpolicy_efficiency"
    budget = Budget(**{**budget.__dict__, **{k: v for k, v in dict(
        calls=args.calls, eval_every=args.eval_every, beta=args.beta, learning_rate=args.lr).items() if v is not None}})
    if budget.calls % budget.eval_every:
        parser.error("--calls must be a multiple of --eval-every")
    out = Path(args.out or ("outputs/offpolicy_efficiency_quick" if args.quick else ROOT / "docs"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    command = command_line("offpolicy_efficiency.py", argv)

    if args.plot_only:
        saved = json.loads(json_path.read_text())
        results, budget, meta = saved["results"], Budget(**saved["budget"]), saved["meta"]
    else:
        keys = args.arms or (QUICK_ARMS if args.quick else [a.key for a in ARMS] if args.testbed else TOY_ARMS)
        if BASELINE not in keys:
            parser.error(f"--arms must include the baseline {BASELINE}")
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
        # longest runs first, so the two workers finish together
        jobs = sorted([(k, s) for s in seeds for k in keys], key=lambda j: -BY_KEY[j[0]].num_iterations)
        print(f"{len(jobs)} runs: arms {keys}, seeds {seeds}, {budget.calls} calls, {args.workers} workers", flush=True)
        workdir = os.environ.get("TMPDIR", "/tmp") + f"/offpolicy_efficiency_{os.getpid()}"
        start = time.time()
        try:
            results = run_all(jobs, budget, args.workers, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        meta = {"command": command, "seconds": time.time() - start, "workers": args.workers, "seeds": seeds,
                "machine": machine_line()}
        json_path.write_text(json.dumps({"budget": budget.__dict__, "meta": meta, "results": results}))

    summary = summarize(results)
    png = plot(summary, out / f"{stem}.png", TARGET_WORDS[budget.target][1], "the testbed" if args.testbed else "the toy task")
    body = section(summary, budget, meta, png.name)
    print(body)
    if not args.quick:
        write_section(out / "performance.md", stem, body)
    print("wrote", json_path, png, *([] if args.quick else [out / "performance.md"]))
    return {"summary": summary, "results": results, "budget": budget}


if __name__ == "__main__":
    main()

"""The paper's KL ablation (Fig. 2) at toy scale: every estimator x placement (x scope) with trl_kl.GRPOTrainer.

    python benchmarks/kl_ablation.py                     # full grid, 69 runs: docs/kl_ablation.md + PNGs (~11 min, 2 cores)
    python benchmarks/kl_ablation.py --quick             # smoke test: 4 variants, 2 seeds, 30 steps (20 s - 1.5 min)
    python benchmarks/kl_ablation.py --seeds 0 1 2 --out docs
    python benchmarks/kl_ablation.py --plot-only         # redraw plots and table from <out>/kl_ablation.json

The grid: k1, k2, k3, k3_clip x (reward, loss), k1 in the reward with each ``kl_reward_scope`` (the other
reward estimators with ``return_to_go``), stock TRL's KL (k3 loss x ratio), no KL, and k1 at the paper's beta
0.04, on-policy; the main variants also off-policy (``num_iterations=2``, ``steps_per_generation=2``) and for
three times the steps. Seeds 0, 1, 2. Each run trains the offline toy policy (``trl_kl.toy``: a char-level
2-layer Qwen2 warm-started on adding two numbers) with ``trl_kl.GRPOTrainer`` under one KL setting, the same
budget for all (optimizer steps, batch, group size, learning rate, seed). Every ``eval_every`` steps it measures, *independently of the estimator
under test*, on a fixed held-out prompt set (the toy's test split):

* ``reward``: mean correctness + closeness (the training reward, in [0, 2]) of completions sampled at T=1;
* ``true_kl``: the sequence KL(pi(y|x) || pi_ref(y|x)), Rao-Blackwellised: completions are sampled token by
  token from the policy, and at every visited state the *exact* per-state KL over the whole vocabulary is
  added up (sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) along the sampled path). Its expectation is the sequence KL
  (chain rule of KL), with less variance than the plain Monte Carlo sum_t log pi/pi_ref(y_t), which is
  recorded too (``mc_kl``) as a check;
* ``entropy``: the sequence entropy, sum_t H(pi(.|s_t)) along the same paths (same estimator);
* ``correct``: held-out correctness alone.

The trainer's own ``is/ess`` (importance-sampling effective sample size fraction) is averaged over training.
Results go to ``<out>/kl_ablation.json`` (all curves), ``<out>/kl_ablation_*.png`` and the table between the
markers of ``<out>/kl_ablation.md`` (the discussion around it is hand-written).
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import command_line, mean_std, run_parallel, write_section  # noqa: E402  (benchmarks/ is on sys.path)

# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    verdict: str  # the paper's / kl.SOUNDNESS's verdict, with docs/theory.md#sequence-kl's refinement
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    trainer: str = "trl_kl"  # "trl_kl", "trl" (stock trl.GRPOTrainer) or "naive" (testbed_ablation's)


def _v(key, label, verdict, trainer="trl_kl", **overrides):
    return Variant(key, label, verdict, overrides, trainer)


VARIANTS = [
    _v("k1-reward-rtg", "k1 in reward, return-to-go", "sound (exact)",
       kl_estimator="k1", kl_placement="reward", kl_reward_scope="return_to_go"),
    _v("k1-reward-token", "k1 in reward, per token (eq. 39)", "sound per state",
       kl_estimator="k1", kl_placement="reward", kl_reward_scope="token"),
    _v("k1-reward-seq", "k1 in reward, sequence sum", "sound (exact, noisier)",
       kl_estimator="k1", kl_placement="reward", kl_reward_scope="sequence"),
    _v("k2-reward", "k2 in reward", "unsound",
       kl_estimator="k2", kl_placement="reward", kl_reward_scope="return_to_go", allow_unsound_kl=True),
    _v("k3-reward", "k3 moved into reward (eq. 35)", "biased",
       kl_estimator="k3", kl_placement="reward", kl_reward_scope="return_to_go"),
    _v("k3clip-reward", "k3_clip moved into reward", "biased",
       kl_estimator="k3_clip", kl_placement="reward", kl_reward_scope="return_to_go"),
    _v("k1-loss", "k1 as loss", "unsound",
       kl_estimator="k1", kl_placement="loss", allow_unsound_kl=True),
    _v("k2-loss", "k2 as loss", "sound per state",
       kl_estimator="k2", kl_placement="loss"),
    _v("k3-loss", "k3 as loss", "biased",
       kl_estimator="k3", kl_placement="loss"),
    _v("k3clip-loss", "k3_clip as loss", "biased",
       kl_estimator="k3_clip", kl_placement="loss"),
    _v("trl-default", "stock TRL: k3 loss x ratio", "sound per state",
       kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True),
    _v("no-kl", "no KL (beta = 0)", "no regularisation", beta=0.0),
    _v("k1-reward-rtg-b0.04", "k1 in reward, return-to-go, the paper's beta 0.04", "sound (exact)",
       kl_estimator="k1", kl_placement="reward", kl_reward_scope="return_to_go", beta=0.04),
]
EXTRA_VARIANTS = [
    _v("stock-trl", "stock trl.GRPOTrainer (k3 loss x ratio)", "sound per state", trainer="trl"),
    _v("naive-current", "k1 in reward per token, penalty from the current policy", "naive off-policy",
       trainer="naive", kl_estimator="k1", kl_placement="reward", kl_reward_scope="token"),
]
"""Run on the testbed only (benchmarks/testbed_ablation.py): stock TRL itself, and the naive off-policy form."""
BY_KEY = {v.key: v for v in VARIANTS + EXTRA_VARIANTS}

REGIMES = {
    # every rollout feeds exactly one optimizer step: pi_old == pi_theta, importance ratio 1
    "on": dict(num_iterations=1, steps_per_generation=1),
    # each rollout (2 batches) feeds 2 optimizer steps, twice: 4 updates per rollout, importance sampling + clip
    "off": dict(num_iterations=2, steps_per_generation=2),
    # on-policy, three times the budget: does the drift go on?
    "long": dict(num_iterations=1, steps_per_generation=1),
    # the testbed's (benchmarks/testbed_ablation.py): mildly off-policy, 2 updates per rollout
    "off2": dict(num_iterations=2, steps_per_generation=1),
    # strongly off-policy: each rollout (4 batches) feeds 4 optimizer steps, 4 times: 16 updates per rollout
    "off16": dict(num_iterations=4, steps_per_generation=4),
    # the same for three times the optimizer steps: as many generations as off16 at 3/16 of on-policy's
    "off16long": dict(num_iterations=4, steps_per_generation=4),
}
REGIME_STEPS = {"on": 1, "off": 1, "long": 3, "off2": 1, "off16": 1, "off16long": 3}
"""Multiplier of ``Budget.steps`` per regime."""
REGIME_LABELS = {"on": "on-policy", "off": "off-policy", "long": "on-policy, 3x steps",
                 "off2": "off-policy x2", "off16": "off-policy x16", "off16long": "off-policy x16, 3x steps"}

MAIN = ["k1-reward-rtg", "k2-loss", "k1-loss", "k2-reward", "trl-default"]
"""Variants also run off-policy (the paper's main algorithm is off-policy GRPO, eq. 39)."""
LONG = ["k1-reward-rtg", "k2-loss", "k1-loss", "k2-reward", "no-kl"]
"""Variants also run three times longer."""

QUICK = ["k1-reward-rtg", "k2-loss", "k1-loss", "k2-reward"]


@dataclass
class Budget:
    """What every run of one invocation shares."""

    steps: int = 100
    eval_every: int = 10
    beta: float = 0.3
    learning_rate: float = 3e-4
    batch: int = 96  # completions per optimizer step (16 prompts x group 6)
    group: int = 6  # the paper's group size
    eval_prompts: int = 256
    eval_samples: int = 4
    task: str = "toy"  # or "testbed", "testbed-large" (benchmarks/testbed_ablation.py)
    device: str = "cpu"  # "cuda": the policy, the reference and the evaluation on the GPU


FULL = Budget()
QUICK_BUDGET = Budget(steps=30, eval_every=10, eval_prompts=128, eval_samples=4)


def grid(variants: list[str], regimes_for: dict[str, list[str]], seeds: list[int]) -> list[tuple[str, str, int]]:
    return [(key, regime, seed) for key in variants for regime in regimes_for[key] for seed in seeds]


# --------------------------------------------------------------------------------------------------------
# One run (in a worker process)
# --------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


@dataclass(frozen=True)
class Task:
    """What a benchmark run trains on and how the held-out evaluation scores it: the toy (``TOY``) or the testbed
    (``benchmarks/testbed_ablation.py``'s ``TESTBED``). Its functions are module-level, so a worker rebuilds the task
    from its name (``task``)."""

    name: str
    model_path: object  # () -> folder of the reference policy (trl_kl.toy / trl_kl.testbed, cached)
    held_out: object  # (tokenizer, n_prompts) -> [(prompt ids (N, L), targets)]
    score: object  # (completions, targets) -> {metric: sum over the completions}
    train: object  # seed -> (reward_funcs, train_dataset)
    max_new_tokens: int
    metrics: tuple  # the keys of score's dict, the first one the headline reward


def task(name: str) -> Task:
    """The task called ``name`` ("toy", "testbed" or "testbed-large")."""
    if name == "toy":
        return TOY
    import testbed_ablation

    return testbed_ablation.TASKS[name]


def _reference(name: str = "toy", device: str = "cpu"):
    """The frozen reference policy of task ``name`` (the warm-started toy, or the testbed's pi_ref) on ``device``
    and its tokenizer, loaded once per worker."""
    if name not in _WORKER:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = task(name).model_path()
        ref = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        _WORKER[name] = (path, ref, AutoTokenizer.from_pretrained(path))
    return _WORKER[name]


def held_out_groups(tokenizer, n_prompts: int):
    """Fixed held-out prompts (toy test split), bucketed by token length so no padding is ever needed."""
    import torch

    from trl_kl import toy

    data = toy.make_dataset(n_prompts, seed=0, split="test")
    buckets: dict[int, list[tuple[list[int], str]]] = {}
    for prompt, answer in zip(data["prompt"], data["answer"], strict=True):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        buckets.setdefault(len(ids), []).append((ids, answer))
    return [(torch.tensor([ids for ids, _ in rows]), [a for _, a in rows]) for _, rows in sorted(buckets.items())]


def toy_score(completions: list[str], targets: list[str]) -> dict[str, float]:
    """The toy's held-out scores, summed: ``reward`` (correctness + closeness, the training reward), ``correct``."""
    from trl_kl import toy

    correct = toy.correctness_reward(completions, targets)
    return {"reward": sum(correct) + sum(toy.closeness_reward(completions, targets)), "correct": sum(correct)}


def toy_train(seed: int):
    """The toy's training reward functions and 2000 training problems drawn with ``seed``."""
    from trl_kl import toy

    return [toy.correctness_reward, toy.closeness_reward], toy.make_dataset(2000, seed=seed, split="train")


def _toy_model_path() -> str:
    from trl_kl import toy

    return toy.toy_model_path()


def evaluate_policy(model, ref, tokenizer, groups, samples: int, max_new_tokens: int, seed: int,
                    score=toy_score) -> dict:
    """Sample ``samples`` completions per held-out prompt from ``model`` at temperature 1, token by token (with the
    KV cache), and measure ``score``'s metrics (the toy's by default), sequence KL to ``ref`` (exact per-state KL
    summed along the path; and the plain Monte Carlo log-ratio sum) and sequence entropy. Deterministic for a given
    ``seed`` (common random numbers across runs)."""
    import torch

    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    totals = dict(true_kl=0.0, mc_kl=0.0, entropy=0.0, length=0.0)
    n = 0
    training = model.training
    model.eval()
    with torch.no_grad():
        for prompts, answers in groups:
            x = prompts.repeat_interleave(samples, dim=0).to(model.device)
            alive = torch.ones(x.size(0), dtype=torch.bool)
            seq_kl = torch.zeros(x.size(0), dtype=torch.float64)
            seq_mc = torch.zeros_like(seq_kl)
            seq_h = torch.zeros_like(seq_kl)
            length = torch.zeros_like(seq_kl)
            generated = []
            cache = {"model": None, "ref": None}
            step_input = x
            for _ in range(max_new_tokens):  # sampled on the CPU (its generator), the forwards on the model's device
                logits = {}
                for name, net in (("model", model), ("ref", ref)):
                    out = net(input_ids=step_input, cache=cache[name], use_cache=True)
                    cache[name], logits[name] = out.cache, out.logits[:, -1].double()
                logp = torch.log_softmax(logits["model"], -1).cpu()
                logq = torch.log_softmax(logits["ref"], -1).cpu()
                p = logp.exp()
                token = torch.multinomial(p.float(), 1, generator=generator).squeeze(-1)
                a = alive.double()
                seq_kl += a * (p * (logp - logq)).sum(-1)
                seq_h += a * -(p * logp).sum(-1)
                seq_mc += a * (logp.gather(-1, token[:, None]) - logq.gather(-1, token[:, None])).squeeze(-1)
                length += a
                token = torch.where(alive, token, torch.full_like(token, eos))
                generated.append(token)
                alive = alive & (token != eos)
                step_input = token[:, None].to(model.device)
                if not alive.any():
                    break
            completions = tokenizer.batch_decode(torch.stack(generated, 1), skip_special_tokens=True)
            targets = [a for a in answers for _ in range(samples)]
            for name, value in score(completions, targets).items():
                totals[name] = totals.get(name, 0.0) + value
            totals["true_kl"] += seq_kl.sum().item()
            totals["mc_kl"] += seq_mc.sum().item()
            totals["entropy"] += seq_h.sum().item()
            totals["length"] += length.sum().item()
            n += x.size(0)
    model.train(training)
    return {k: v / n for k, v in totals.items()}


TOY = Task("toy", _toy_model_path, held_out_groups, toy_score, toy_train, 4, ("reward", "correct"))


def exact_sequence_kl(model, ref, prompt, max_new_tokens: int, eos: int) -> tuple[float, float]:
    """Sequence KL(pi(y|x) || pi_ref(y|x)) and entropy H(pi(y|x)) of one prompt ``(1, L)`` by enumerating every
    completion prefix (completions end at ``eos`` or after ``max_new_tokens``): the check of
    ``evaluate_policy``'s sampled estimates (tests/test_ablation.py). V^(T-1) prefixes at the last step."""
    import torch

    with torch.no_grad():
        prefixes = prompt
        reach = torch.ones(1, dtype=torch.float64)  # probability of reaching each prefix
        total_kl = total_entropy = 0.0
        for t in range(max_new_tokens):
            logp = torch.log_softmax(model(input_ids=prefixes).logits[:, -1].double(), -1)
            logq = torch.log_softmax(ref(input_ids=prefixes).logits[:, -1].double(), -1)
            p = logp.exp()
            total_kl += (reach * (p * (logp - logq)).sum(-1)).sum().item()
            total_entropy += (reach * -(p * logp).sum(-1)).sum().item()
            if t == max_new_tokens - 1:
                break
            tokens = torch.tensor([v for v in range(p.size(-1)) if v != eos])
            reach = (reach[:, None] * p[:, tokens]).reshape(-1)
            prefixes = torch.cat(
                [prefixes.repeat_interleave(len(tokens), 0), tokens.repeat(prefixes.size(0))[:, None]], dim=1
            )
    return total_kl, total_entropy


def toy_run_settings(**settings) -> dict:
    """GRPOConfig fields every toy benchmark run shares, updated with ``settings``: constant learning rate (drift
    must not be hidden by a decaying step size), completions of at most 4 tokens sampled at T=1, loss_type ``dapo``
    (TRL 1.16's default, pinned: a stock-TRL arm then differs from trl_kl's only in the KL), float32 on CPU
    (TRL defaults to bf16 autocast: slow and lossy there), a log line every step, no checkpoints, no printing."""
    return dict(
        lr_scheduler_type="constant",
        max_completion_length=4,
        temperature=1.0,
        loss_type="dapo",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    ) | settings


def config_for(key: str, regime: str, seed: int, budget: Budget, output_dir: str):
    """The run's GRPOConfig: trl_kl's, or stock TRL's for a ``trainer="trl"`` variant."""
    import trl

    import trl_kl

    config_cls = trl.GRPOConfig if BY_KEY[key].trainer == "trl" else trl_kl.GRPOConfig
    settings = toy_run_settings(
        max_completion_length=task(budget.task).max_new_tokens,
        output_dir=output_dir,
        max_steps=budget.steps * REGIME_STEPS[regime],
        seed=seed,
        learning_rate=budget.learning_rate,
        per_device_train_batch_size=budget.batch,
        num_generations=budget.group,
        beta=budget.beta,
        use_cpu=budget.device == "cpu",
    )
    settings.update(REGIMES[regime])
    settings.update(BY_KEY[key].overrides)
    return config_cls(**settings)


def trainer_class(variant: Variant):
    """trl_kl.GRPOTrainer, stock trl.GRPOTrainer, or the testbed's naive off-policy subclass."""
    import trl

    import trl_kl

    if variant.trainer == "naive":
        import testbed_ablation

        return testbed_ablation.NaiveCurrentPolicyGRPOTrainer
    return trl.GRPOTrainer if variant.trainer == "trl" else trl_kl.GRPOTrainer


def _compact(value, digits: int = 4):
    """A float rounded to ``digits`` significant digits for the JSON record; None for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(f"{float(value):.{digits}g}")


def train_summary(train_log: dict[str, list]) -> dict:
    """The trainer's importance-sampling metrics over a run (the per-step log is not kept)."""
    ess = [v for v in train_log["is/ess"] if v is not None]
    clip = [v for v in train_log["is/clip_frac"] if v is not None]
    return {
        "ess_mean": _compact(sum(ess) / len(ess), 5) if ess else None,
        "ess_min": _compact(min(ess), 5) if ess else None,
        "clip_frac_mean": _compact(sum(clip) / len(clip), 5) if clip else None,
    }


def toy_trainer(trainer_cls, args, callback, task_name: str = "toy"):
    """A GRPO trainer (``trl_kl``'s or stock TRL's) on the task's reference policy with its training rewards and
    prompts drawn with ``args.seed`` (the toy: correctness + closeness, 2000 training problems); ``callback``
    records, nothing prints."""
    from transformers import PrinterCallback, ProgressCallback

    path, _, tokenizer = _reference(task_name)
    reward_funcs, dataset = task(task_name).train(args.seed)
    trainer = trainer_cls(
        model=path,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    return trainer


def run_one(key: str, regime: str, seed: int, budget: Budget, workdir: str) -> dict:
    """Train one variant and return its curves."""
    from transformers import TrainerCallback

    run_task = task(budget.task)
    _, ref, tokenizer = _reference(budget.task, budget.device)
    groups = run_task.held_out(tokenizer, budget.eval_prompts)
    names = ("step", *run_task.metrics, "true_kl", "mc_kl", "entropy", "length")
    curves: dict[str, list] = {name: [] for name in names}
    train_log: dict[str, list] = {"step": [], "reward": [], "is/ess": [], "is/clip_frac": [], "kl/seq_kl": []}

    def evaluate(model, step):
        stats = evaluate_policy(model, ref, tokenizer, groups, budget.eval_samples, run_task.max_new_tokens,
                                seed=10_000 * seed + step, score=run_task.score)
        curves["step"].append(step)
        for name in curves:
            if name != "step":
                curves[name].append(_compact(stats[name], 5))

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            # every optimizer step logs the loss and is/*; "reward" only at the steps that generate
            if logs and "loss" in logs:
                train_log["step"].append(state.global_step)
                for name in train_log:
                    if name != "step":
                        train_log[name].append(_compact(logs.get(name)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % budget.eval_every == 0 or state.global_step == steps:
                evaluate(model, state.global_step)

    start = time.time()
    args = config_for(key, regime, seed, budget, os.path.join(workdir, f"{key}-{regime}-{seed}"))
    steps = args.max_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = toy_trainer(trainer_class(BY_KEY[key]), args, Recorder(), budget.task)
        evaluate(trainer.model, 0)
        trainer.train()
    result = {"key": key, "regime": regime, "seed": seed, "curves": curves, **train_summary(train_log),
              "seconds": round(time.time() - start, 1)}
    del trainer
    return result


def _run_job(job):
    key, regime, seed, budget, workdir = job
    result = run_one(key, regime, seed, budget, workdir)
    c = result["curves"]
    headline = task(budget.task).metrics[0]
    print(
        f"  {key:16s} {regime:3s} seed {seed}: {headline} {c[headline][0]:.3f} -> {c[headline][-1]:.3f}, "
        f"true KL {c['true_kl'][-1]:.3f}, entropy {c['entropy'][-1]:.3f}, ESS {result['ess_mean'] or float('nan'):.3f} "
        f"({result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def run_grid(jobs: list[tuple[str, str, int]], budget: Budget, workers: int, workdir: str) -> list[dict]:
    """Run the jobs in ``workers`` processes (one torch thread each); results in job order."""
    return run_parallel(_run_job, [(key, regime, seed, budget, workdir) for key, regime, seed in jobs], workers)


# --------------------------------------------------------------------------------------------------------
# Summaries, table, plots
# --------------------------------------------------------------------------------------------------------

METRICS = ("reward", "correct", "true_kl", "mc_kl", "entropy")


def summarize(results: list[dict], metrics: tuple = METRICS) -> dict[tuple[str, str], dict]:
    """Per (variant, regime): mean and std over seeds of the final value of each metric (the last
    ``final_window`` evaluations averaged, to damp the held-out sampling noise), and of the mean ESS."""
    out: dict[tuple[str, str], dict] = {}
    for r in results:
        out.setdefault((r["key"], r["regime"]), {"runs": []})["runs"].append(r)
    for entry in out.values():
        runs = entry["runs"]
        for metric in metrics:
            entry[metric] = mean_std([_final(r["curves"][metric]) for r in runs])
            entry[metric + "_start"] = mean_std([r["curves"][metric][0] for r in runs])
        entry["ess"] = mean_std([r["ess_mean"] for r in runs])
        entry["clip_frac"] = mean_std([r["clip_frac_mean"] for r in runs])
        entry["ess_min"] = min((r["ess_min"] for r in runs if r["ess_min"] is not None), default=float("nan"))
        entry["seeds"] = sorted(r["seed"] for r in runs)
    return out


def _final(curve: list[float], window: int = 2) -> float:
    """Mean of the last ``window`` evaluations."""
    tail = curve[-window:]
    return sum(tail) / len(tail)


def table(summary: dict, budget: Budget) -> str:
    def fmt(pair, digits=3):
        mean, std = pair
        return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    start = next(iter(summary.values()))
    lines = [
        f"Start (the warm-started toy, before RL): held-out reward {start['reward_start'][0]:.3f}, correctness "
        f"{start['correct_start'][0]:.3f}, sequence entropy {start['entropy_start'][0]:.3f}, true KL 0.",
        "",
        "| variant | verdict | regime | held-out reward | correctness | true seq. KL | MC check of KL | seq. entropy | IS ESS: mean (min) | clipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v.key: i for i, v in enumerate(VARIANTS)}
    regime_order = list(REGIMES)
    for (key, regime), s in sorted(summary.items(), key=lambda kv: (regime_order.index(kv[0][1]), order[kv[0][0]])):
        v = BY_KEY[key]
        lines.append(
            f"| `{key}` ({v.label}) | {v.verdict} | {REGIME_LABELS[regime]} | "
            f"{fmt(s['reward'])} | {fmt(s['correct'])} | {fmt(s['true_kl'])} | {fmt(s['mc_kl'])} | "
            f"{fmt(s['entropy'])} | {fmt(s['ess'])} (min {s['ess_min']:.2f}) | {100 * s['clip_frac'][0]:.1f}% |"
        )
    seeds = next(iter(summary.values()))["seeds"]
    lines += [
        "",
        f"Final values: mean of the last two evaluations (steps {budget.steps - budget.eval_every} and "
        f"{budget.steps}" + (f"; {3 * budget.steps - budget.eval_every} and {3 * budget.steps} for 3x steps"
                             if any(regime == "long" for _, regime in summary) else "") + ") of each run, "
        f"then mean ± std over seeds {seeds}. Held-out set: {budget.eval_prompts} "
        f"test-split prompts x {budget.eval_samples} samples at T=1. IS ESS: the trainer's `is/ess` (effective "
        "sample size fraction of the sequence importance weights) averaged over the optimizer steps of a run, and "
        "its minimum over all steps and seeds; 1 on-policy by construction. Clipped: the trainer's `is/clip_frac`, "
        "the fraction of completion tokens whose ratio is outside the PPO clip range, averaged over steps and seeds.",
    ]
    return "\n".join(lines)


COLORS = {
    "k1-reward-rtg": "tab:blue",
    "k1-reward-token": "tab:cyan",
    "k1-reward-seq": "tab:purple",
    "k2-reward": "tab:red",
    "k3-reward": "tab:orange",
    "k3clip-reward": "tab:brown",
    "k1-loss": "tab:pink",
    "k2-loss": "tab:green",
    "k3-loss": "tab:olive",
    "k3clip-loss": "goldenrod",
    "trl-default": "black",
    "no-kl": "tab:gray",
    "k1-reward-rtg-b0.04": "lightsteelblue",
}

FIGURES = {
    "placement": ("Estimator x placement, on-policy",
                  [(k, "on") for k in ("k1-reward-rtg", "k2-loss", "k1-loss", "k2-reward", "k3-reward", "k3-loss",
                                       "trl-default", "no-kl")]),
    "scope": ("k1 in the reward: scope; k3_clip; on-policy",
              [(k, "on") for k in ("k1-reward-rtg", "k1-reward-token", "k1-reward-seq", "k3clip-reward",
                                   "k3clip-loss", "k2-loss", "k1-reward-rtg-b0.04", "no-kl")]),
    "offpolicy": ("On-policy (dashed) vs off-policy (solid: 2 iterations x 2 steps per generation)",
                  [(k, r) for k in MAIN for r in ("on", "off")]),
    "long": ("On-policy, 3x the budget", [(k, "long") for k in LONG]),
}


PANELS = (("reward", "held-out reward", "held-out reward (correct + close, T=1)"),
          ("true_kl", "true sequence KL", "KL(pi(y|x) || pi_ref(y|x)), nats"),
          ("entropy", "policy entropy", "sequence entropy, nats"))
"""(metric, title, y label) of each panel of a figure."""


def plot(results: list[dict], out: Path, budget: Budget, names: list[str] | None = None, figures=None,
         panels=PANELS, colors=None, prefix: str = "kl_ablation", setting: str = "GRPO on the toy task",
         log_kl: bool = False) -> list[Path]:
    """One PNG ``<prefix>_<name>.png`` per figure (``FIGURES`` by default; only ``names`` if given): a panel per
    metric, the seed mean of each (variant, regime) with its min..max band; on-policy dashed in the off-policy
    figures; the KL panel on a symlog scale with ``log_kl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, colors = figures or FIGURES, colors or COLORS
    by = {}
    for r in results:
        by.setdefault((r["key"], r["regime"]), []).append(r)
    written = []
    for name, (title, series) in figures.items():
        if names is not None and name not in names:
            continue
        series = [s for s in series if s in by]
        if not series:
            continue
        offpolicy = name.startswith("offpolicy")
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
        for key, regime in series:
            runs = by[(key, regime)]
            steps = runs[0]["curves"]["step"]
            for ax, (metric, _, _) in zip(axes, panels, strict=True):
                values = [[r["curves"][metric][i] for r in runs] for i in range(len(steps))]
                mean = [sum(v) / len(v) for v in values]
                style = "--" if (offpolicy and regime == "on") else "-"
                label = f"{key}" + (f" ({regime})" if offpolicy else "")
                ax.plot(steps, mean, style, color=colors[key], label=label, lw=1.6)
                if len(runs) > 1:
                    ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colors[key],
                                    alpha=0.12, lw=0)
        for ax, (metric, panel_title, ylabel) in zip(axes, panels, strict=True):
            ax.set(xlabel="optimizer step", ylabel=ylabel, title=panel_title)
            ax.grid(alpha=0.3)
            if log_kl and metric == "true_kl":
                ax.set_yscale("symlog", linthresh=1.0)
        axes[1].legend(fontsize=7.5, ncol=1 if len(series) <= 8 else 2)
        seeds = sorted({r["seed"] for r in results})
        fig.suptitle(f"{title}. {setting}, beta {budget.beta}, batch {budget.batch}, group {budget.group}; "
                     f"mean of seeds {seeds}, band = min..max", fontsize=10)
        fig.tight_layout()
        path = out / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


TABLE = "ablation-table"  # the marked block of docs/kl_ablation.md this script writes


def write_table(md_path: Path, text: str, command: str, name: str = TABLE,
                new_page: str = "# KL ablation on the toy task\n") -> None:
    """The generated table between ``name``'s markers in ``md_path``, with the command that made it."""
    write_section(md_path, name, f"<!-- generated by: {command} -->\n\n{text}\n", new_page=new_page)


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 variants, on-policy, short budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--out", default=None, help="output folder (default: docs; quick: outputs/kl_ablation_quick)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(BY_KEY), help="subset of the grid")
    parser.add_argument("--regimes", nargs="+", default=None, choices=list(REGIMES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--plot-only", action="store_true", help="redraw from <out>/kl_ablation.json")
    args = parser.parse_args(argv)

    budget = QUICK_BUDGET if args.quick else FULL
    budget = Budget(**{**budget.__dict__, **{k: v for k, v in dict(
        steps=args.steps, eval_every=args.eval_every, beta=args.beta, learning_rate=args.lr).items() if v is not None}})
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    out = Path(args.out or ("outputs/kl_ablation_quick" if args.quick else ROOT / "docs"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "kl_ablation.json"
    command = command_line("kl_ablation.py", argv)

    if args.plot_only:
        saved = json.loads(json_path.read_text())
        results, budget = saved["results"], Budget(**saved["budget"])
        command = saved.get("command", command)
    else:
        variants = args.variants or (QUICK if args.quick else [v.key for v in VARIANTS])
        regimes_for = {k: ([r for r in args.regimes] if args.regimes else
                           (["on"] if args.quick else ["on"] + ["off"] * (k in MAIN) + ["long"] * (k in LONG)))
                       for k in variants}
        jobs = sorted(grid(variants, regimes_for, seeds), key=lambda job: -REGIME_STEPS[job[1]])  # long runs first
        print(f"{len(jobs)} runs: {len(variants)} variants, seeds {seeds}, {budget.steps} steps, beta {budget.beta}, "
              f"{args.workers} workers", flush=True)
        workdir = os.environ.get("TMPDIR", "/tmp") + f"/kl_ablation_{os.getpid()}"
        start = time.time()
        try:
            results = run_grid(jobs, budget, args.workers, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # the trainers' (empty) output folders
        elapsed = time.time() - start
        print(f"done in {elapsed:.0f} s", flush=True)
        json_path.write_text(json.dumps({"budget": budget.__dict__, "command": command, "seconds": elapsed,
                                         "results": results}))

    summary = summarize(results)
    text = table(summary, budget)
    print(text)
    written = plot(results, out, budget, names=["placement"] if args.quick else None)
    write_table(out / "kl_ablation.md", text, command)
    print("wrote", *([] if args.plot_only else [json_path]), out / "kl_ablation.md", *written)
    return {"summary": summary, "results": results, "budget": budget}


if __name__ == "__main__":
    main()

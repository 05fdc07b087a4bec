"""Step-time overhead of trl_kl's GRPOTrainer against stock ``trl.GRPOTrainer``, on the offline toy policy.

    python benchmarks/grpo_overhead.py [--quick] [--repeats N] [--output docs/performance.md]
    python benchmarks/grpo_overhead.py --model wide --repeats 24 --steps 8    # a 3.2M-parameter policy, 16 tokens

Compared, at the same beta (0.04), model, batch, seed and max_completion_length:

* **stock**: ``trl.GRPOTrainer`` with its defaults, i.e. k3 as a loss times the importance ratio
  (``use_bias_correction_kl=True``);
* **trl_kl**: ``trl_kl.GRPOTrainer`` with its defaults, i.e. k1 in the per-token reward, scope ``return_to_go``.

Two regimes: on-policy (``num_iterations=1, steps_per_generation=1``) and off-policy (``num_iterations=2,
steps_per_generation=2``: one generation every 4 optimizer steps). Everything runs in float32
(``bf16=False``: TRL's GRPOConfig defaults to bf16 autocast, even on CPU); every other field keeps TRL's
default (``loss_type="dapo"``, ``gradient_checkpointing=True``, ``logging_steps=10``, ``learning_rate=1e-6``).

Four measurements; in the first two the trainers are *interleaved* in one process (blocks alternate, the
pair order flips every repeat: AB BA AB ..., so machine noise and drift hit both equally):

1. **full step**: per block, a freshly built trainer runs ``trainer.train()`` for 1 + ``--steps`` optimizer
   steps; a ``TrainerCallback`` stamps ``time.perf_counter()`` at each ``on_step_end``. Construction and the
   first (warm-up) step are excluded; the block's value is its mean wall time per optimizer step over the
   remaining steps (a whole number of generation cycles off-policy, so generation is included in
   proportion);
2. **loss fwd+bwd**: ``trainer._compute_loss(model, batch)`` then ``loss.backward()`` on one fixed rollout
   batch shared by both trainers (the block's value is the median over its calls);
3. **forward counts**: forward hooks on the policy's and the reference model's backbone count model
   forwards during one generation cycle of each trainer, split into generation (decoding), no-grad
   log-prob passes (rollout: old / reference log-probs) and the loss forward (with grad);
4. **breakdown**: one more trl_kl block with the code trl_kl adds to TRL's step (KL metrics, reward
   shaping, advantage recomputation, end-of-step hook) wrapped in timers, to show where the extra time goes.

``--model toy`` (default) is the warm-started toy policy (75k parameters, completions of at most 4 tokens): the
worst case for a fixed per-step cost. ``--model wide`` is a randomly initialised 4-layer Qwen2 of width 256
(3.2M parameters) on the toy's tokenizer with completions of 16 tokens, still tiny next to an LLM, to show how
the ratio moves when the model's own work grows (its section has its own markers, ``grpo_overhead_wide``).

Torch runs on one thread by default (``--threads``): the toy's kernels are too small to gain much from more,
and on a shared machine multi-threaded kernels turn other processes' load into stalls of 10-100x.

The ratio trl_kl / stock is the ratio of the medians over blocks; its 95% interval is a percentile
bootstrap that resamples repeats (a repeat = one stock block and one trl_kl block, kept together).
The results are written between ``<!-- grpo_overhead:start -->`` and ``<!-- grpo_overhead:end -->`` of
``--output`` (created with a short header when missing); the rest of the file is left as it is.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
import trl
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import trl_kl
from _common import machine, write_section  # benchmarks/ is on sys.path when run as a script
from trl_kl.toy import correctness_reward, make_dataset, toy_model_path

MODELS = {
    "toy": dict(
        marker="grpo_overhead",
        title="",
        description="Toy policy (`trl_kl.toy`, 2-layer Qwen2, width 64, 75k parameters, warm-started)",
        config={},  # COMMON as it is
    ),
    "wide": dict(
        marker="grpo_overhead_wide",
        title=", a 3.2M-parameter policy",
        description="A randomly initialised 4-layer Qwen2 of width 256 (intermediate 768, 3.2M parameters) on the "
        "toy's character tokenizer (`--model wide`)",
        config=dict(max_completion_length=16),
    ),
}
HEADER = """# Performance

Measurements of trl_kl against stock TRL. Each section below is written by the script it names, between
its own `<!-- name:start -->` / `<!-- name:end -->` markers; rerunning a script replaces only its section.
"""
TARGET = 1.03
BETA = 0.04
SEED = 0
COMMON = dict(  # the batch of recipes/grpo_*.yaml: 2 prompts x 6 completions per optimizer step
    per_device_train_batch_size=12,
    num_generations=6,
    beta=BETA,
    seed=SEED,
    max_completion_length=4,  # the toy's; --model wide overrides it (MODELS)
    loss_type="dapo",  # TRL's default, for both (trl_kl's own default is dr_grpo)
    bf16=False,  # TRL defaults to bf16 autocast, even on CPU: time float32
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
REGIMES = {
    "on-policy": dict(num_iterations=1, steps_per_generation=1),
    "off-policy": dict(num_iterations=2, steps_per_generation=2),
}
TRAINERS = {
    "stock": (trl.GRPOConfig, trl.GRPOTrainer),  # k3 as a loss x importance ratio (use_bias_correction_kl=True)
    "trl_kl": (trl_kl.GRPOConfig, trl_kl.GRPOTrainer),  # k1 in the reward, return_to_go
}
BOOTSTRAP = 2000


# ---- building trainers ------------------------------------------------------------------------------


def wide_model_path(folder: str) -> str:
    """Save the ``--model wide`` policy (random init, seed 0) with the toy's tokenizer under ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_kl import toy

    tokenizer = toy.build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    path = os.path.join(folder, "wide")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_trainer(name: str, regime: str, model_path: str, output_dir: str, **overrides):
    config_cls, trainer_cls = TRAINERS[name]
    args = config_cls(output_dir=output_dir, **COMMON, **REGIMES[regime], **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model_path, reward_funcs=[correctness_reward], args=args, train_dataset=make_dataset(512, SEED)
        )
    for callback in (PrinterCallback, ProgressCallback):  # no printing inside the timed loop
        trainer.remove_callback(callback)
    if name == "stock":  # TRL's default KL: k3 as a loss, times the importance ratio
        assert trainer.args.use_bias_correction_kl and not isinstance(trainer, trl_kl.GRPOTrainer)
    else:  # trl_kl's defaults
        assert (args.kl_estimator, args.kl_placement, args.kl_reward_scope) == ("k1", "reward", "return_to_go")
    return trainer


class StepClock(TrainerCallback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def generate_every(regime: str) -> int:
    return REGIMES[regime]["num_iterations"] * REGIMES[regime]["steps_per_generation"]


# ---- 1. full optimizer steps --------------------------------------------------------------------------


def full_step_block(name: str, regime: str, model_path: str, steps: int, tmp: str) -> tuple[float, int]:
    """Mean seconds per optimizer step over ``steps`` steps after a warm-up step, and the tokens processed."""
    trainer = build_trainer(name, regime, model_path, tmp, max_steps=1 + steps)
    clock = StepClock()
    trainer.add_callback(clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(clock.stamps) == 1 + steps, clock.stamps
    tokens = trainer.state.num_input_tokens_seen
    del trainer
    gc.collect()
    return (clock.stamps[-1] - clock.stamps[0]) / steps, tokens


# ---- 2. loss forward + backward -----------------------------------------------------------------------


def fixed_batch(trainer, regime: str) -> dict:
    """One real rollout slice (12 completions) generated by ``trainer``; off-policy, its old and reference
    log-probs are moved by seeded noise so the importance ratio and the KL are not trivially 1 and 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch = dict(batch)
    gen = torch.Generator().manual_seed(SEED)
    ref = batch["ref_per_token_logps"]
    batch["ref_per_token_logps"] = ref + 0.5 * torch.randn(ref.shape, generator=gen)
    if regime == "off-policy":
        old = batch["old_per_token_logps"]
        batch["old_per_token_logps"] = old + 0.15 * torch.randn(old.shape, generator=gen)
    else:
        assert batch.get("old_per_token_logps") is None  # on-policy TRL computes no old log-probs
    return batch


def loss_block(trainer, batch: dict, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        trainer.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    for metrics in trainer._metrics.values():
        metrics.clear()
    return times


def prepare_for_loss(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1


BREAKDOWN = (  # (label, owner, attribute): the code trl_kl adds to a step, timed inside a training block
    ("KL metrics and KL loss term (`_kl_loss_and_metrics`, in the loss)", "trainer", "_kl_loss_and_metrics"),
    ("of which KL metrics (`_kl_metrics`)", "trainer", "_kl_metrics"),
    ("of which logging every metric, one gather + one sync (`_log_metrics`)", "trainer", "_log_metrics"),
    ("reward shaping in the log-prob hook (`kl.kl_shaped_advantages`)", "kl", "kl_shaped_advantages"),
    ("advantages recomputed at rollout (`_advantages`)", "trainer", "_advantages"),
    ("end-of-step hook (`_end_of_optimizer_step`)", "trainer", "_end_of_optimizer_step"),
)


def step_breakdown(regime: str, model_path: str, steps: int, tmp: str) -> dict:
    """Mean ms per optimizer step spent in each piece of ``BREAKDOWN`` during a trl_kl training block (wall
    time of timer-wrapped functions; pieces missing from the installed trl_kl are skipped), with the block's
    mean step time."""
    import trl_kl.grpo as grpo_module

    trainer = build_trainer("trl_kl", regime, model_path, tmp, max_steps=1 + steps)
    totals, restore = {}, []
    for label, owner, attribute in BREAKDOWN:
        target = trainer if owner == "trainer" else getattr(grpo_module, "kl", None)
        original = getattr(target, attribute, None)
        if original is None:
            continue

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        restore.append((target, attribute, original, owner == "trainer"))
        setattr(target, attribute, timed)
        totals[label] = 0.0

    class Snapshot(StepClock):  # totals and time at the end of the warm-up step and of the last step
        def __init__(self):
            super().__init__()
            self.totals = []

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            self.totals.append(dict(totals))

    clock = Snapshot()
    trainer.add_callback(clock)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        for target, attribute, original, is_instance in restore:
            if is_instance:
                delattr(target, attribute)  # back to the class's method
            else:
                setattr(target, attribute, original)
    first, last = clock.totals[0], clock.totals[-1]
    result = {"trl_kl step (instrumented block)": (clock.stamps[-1] - clock.stamps[0]) / steps}
    result.update({label: (last[label] - first[label]) / steps for label in totals})
    del trainer
    gc.collect()
    return result


# ---- 3. forward counts --------------------------------------------------------------------------------


@dataclass
class ForwardCounter:
    phase: str = "generate"
    counts: dict = field(default_factory=dict)

    def hook(self, role: str):
        def count(module, args, kwargs, output):
            key = (role, self.phase if role == "policy" else "logps")
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows = ids.size(0) if ids is not None else kwargs["inputs_embeds"].size(0)
            calls, total = self.counts.get(key, (0, 0))
            self.counts[key] = (calls + 1, total + rows)

        return count


def count_forwards(name: str, regime: str, model_path: str, tmp: str) -> dict:
    """Model forwards over one generation cycle (1 step on-policy, 4 off-policy) of a fresh trainer."""
    steps = generate_every(regime)
    trainer = build_trainer(name, regime, model_path, tmp, max_steps=steps)
    counter = ForwardCounter()
    handles = [trainer.model.base_model.register_forward_hook(counter.hook("policy"), with_kwargs=True)]
    if trainer.ref_model is not None:
        handles.append(trainer.ref_model.base_model.register_forward_hook(counter.hook("ref"), with_kwargs=True))
    original = trainer._get_per_token_logps_and_entropies

    def wrapped(*args, **kwargs):  # a log-prob pass: the loss forward when grad is on, else a rollout pass
        counter.phase = "loss" if torch.is_grad_enabled() else "rollout"
        try:
            return original(*args, **kwargs)
        finally:
            counter.phase = "generate"

    trainer._get_per_token_logps_and_entropies = wrapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    for handle in handles:
        handle.remove()
    c = counter.counts
    result = {
        "steps": steps,
        "generate": c.get(("policy", "generate"), (0, 0)),
        "rollout": c.get(("policy", "rollout"), (0, 0)),
        "loss": c.get(("policy", "loss"), (0, 0)),
        "ref": c.get(("ref", "logps"), (0, 0)),
        "tokens": trainer.state.num_input_tokens_seen,
    }
    del trainer
    gc.collect()
    return result


# ---- statistics ---------------------------------------------------------------------------------------


def summarise(stock: np.ndarray, ours: np.ndarray, seed: int = SEED) -> dict:
    """Medians and IQRs over blocks, ratio of medians, and its repeat-resampling bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(stock), size=(BOOTSTRAP, len(stock)))
    boot = np.median(ours[idx], axis=1) / np.median(stock[idx], axis=1)
    return {
        "stock": np.median(stock),
        "stock_iqr": np.percentile(stock, [25, 75]),
        "ours": np.median(ours),
        "ours_iqr": np.percentile(ours, [25, 75]),
        "ratio": np.median(ours) / np.median(stock),
        "ci": np.percentile(boot, [2.5, 97.5]),
        "paired": np.median(ours / stock),
        "n": len(stock),
    }


# ---- machine and report -------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{1e3 * x:.2f}"


def render(opts, info: dict, results: dict, forwards: dict, breakdowns: dict, seconds: float) -> str:
    load0, load1 = info["load_start"], info["load_end"]
    model = MODELS[opts.model]
    lines = [
        f"## GRPO step-time overhead: trl_kl vs stock TRL{model['title']}",
        "",
        "Generated by `benchmarks/grpo_overhead.py` (method in its docstring). Command:",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"**Machine.** {info['cpu']}, {info['cores']} cores visible, torch threads {info['threads']} (torch's default "
        f"here: {info['default_threads']}; `--threads`); "
        f"{info['versions']}; CPU only. Load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end "
        f"(a shared machine: that is why the two trainers are interleaved). Run time {seconds:.0f} s.",
        "",
        f"**Setup.** {model['description']}, beta = 0.04, seed 0, "
        "per_device_train_batch_size 12 (2 prompts x num_generations 6), "
        f"max_completion_length {COMMON['max_completion_length']}, "
        "**`bf16=False`** (TRL's GRPOConfig defaults to bf16 autocast even on CPU; here all float32), every "
        "other field TRL's default (loss_type `dapo`, gradient_checkpointing on, logging_steps 10, learning_rate 1e-6: "
        "small enough that both trainers sample the same rollouts, see the workload check at the end). "
        "*stock* = `trl.GRPOTrainer` (k3 as a loss times the importance ratio, `use_bias_correction_kl=True`); "
        "*trl_kl* = `trl_kl.GRPOTrainer` defaults (k1 in the per-token reward, scope `return_to_go`). "
        "On-policy: num_iterations 1, steps_per_generation 1; off-policy: num_iterations 2, steps_per_generation 2 "
        "(one generation per 4 optimizer steps).",
        "",
        f"**Method.** {opts.repeats} repeats per regime; each repeat runs one stock block and one trl_kl block, "
        "the order flipping every repeat (AB BA AB ...). *Full step*: a fresh trainer per block (construction "
        f"untimed) runs 1 warm-up + {opts.steps} optimizer steps, timed by `time.perf_counter()` at `on_step_end`; "
        "the block's value is the mean wall time per step after the warm-up (generation, reward, reference "
        "forward, loss, backward, optimizer, logging). "
        f"*Loss fwd+bwd*: `_compute_loss(model, batch)` + `backward()` on one fixed 12-completion rollout batch "
        f"shared by both trainers, {opts.loss_calls} timed calls per block after {opts.loss_warmup} untimed ones; "
        "the block's value is the median call. Times are medians over blocks [interquartile range], in ms. "
        "Ratio = trl_kl median / stock median; 95% CI: percentile bootstrap over repeats "
        f"({BOOTSTRAP} resamples, a stock block and its trl_kl partner resampled together).",
        "",
        "| regime | component | stock ms [IQR] | trl_kl ms [IQR] | ratio trl_kl/stock | 95% CI | median paired ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for (regime, component), s in results.items():
        lines.append(
            f"| {regime} | {component} | {ms(s['stock'])} [{ms(s['stock_iqr'][0])}, {ms(s['stock_iqr'][1])}] "
            f"| {ms(s['ours'])} [{ms(s['ours_iqr'][0])}, {ms(s['ours_iqr'][1])}] | {s['ratio']:.3f} "
            f"| [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {s['paired']:.3f} |"
        )
    lines += ["", f"**Target** (trl_kl full step <= {TARGET}x stock):"]
    for (regime, component), s in results.items():
        if component != "full step":
            continue
        if s["ci"][1] <= TARGET:
            verdict = f"met (the whole CI is below {TARGET})"
        elif s["ratio"] <= TARGET:
            verdict = f"met by the point estimate; the CI reaches {s['ci'][1]:.3f}"
        else:
            verdict = "**not met**"
        lines.append(f"- {regime}: ratio {s['ratio']:.3f}, {verdict}.")
    lines += [
        "",
        "**Where trl_kl's extra time goes.** One more trl_kl full-step block per regime (1 warm-up + "
        f"{2 * opts.steps} steps, not interleaved), the code trl_kl adds to TRL's step wrapped in timers: mean ms "
        "per optimizer step (the 'of which' rows are inside the row above them). The last two rows are the "
        "interleaved differences from the table above, for scale.",
        "",
        "| piece | " + " | ".join(breakdowns) + " |",
        "|---|" + "---|" * len(breakdowns),
    ]
    for label in next(iter(breakdowns.values()), {}):
        lines.append(f"| {label} | " + " | ".join(ms(b.get(label, float("nan"))) for b in breakdowns.values()) + " |")
    for component in ("full step", "loss fwd+bwd"):
        diffs = (ms(results[(r, component)]["ours"] - results[(r, component)]["stock"]) for r in breakdowns)
        lines.append(f"| {component}: trl_kl - stock (interleaved medians) | " + " | ".join(diffs) + " |")
    lines += [
        "",
        "**Model forwards per generation cycle** (forward hooks on the policy's and the reference model's "
        "backbone; one cycle = 1 optimizer step on-policy, 4 off-policy; the first cycle of a fresh trainer). "
        "*generate*: decoding forwards of `model.generate`; *rollout log-probs*: no-grad policy passes at rollout "
        "(TRL's old log-probs); *loss*: the policy forward inside `_compute_loss` (with grad; gradient "
        "checkpointing recomputes its decoder layers in backward, in both trainers alike); *reference*: "
        "reference-model passes. Each cell: forward calls (rows, i.e. sequences, summed over the calls); TRL "
        "runs log-prob passes in chunks of per_device_train_batch_size = 12 rows, and off-policy a generation "
        "covers 2 x 12 completions.",
        "",
        "| regime | trainer | optimizer steps | generate | rollout log-probs (policy, no grad) | loss (policy, grad) | reference | tokens seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (regime, name), f in forwards.items():
        cells = " | ".join(f"{f[k][0]} ({f[k][1]})" for k in ("generate", "rollout", "loss", "ref"))
        lines.append(f"| {regime} | {name} | {f['steps']} | {cells} | {f['tokens']} |")
    lines.append("")
    same = all(
        {k: v for k, v in forwards[(r, "stock")].items()} == {k: v for k, v in forwards[(r, "trl_kl")].items()}
        for r in REGIMES
    )
    lines.append(
        "trl_kl makes exactly the same model forwards as stock TRL in both regimes: on-policy it adds no pass, "
        "its k1 penalty reads the policy log-probs of TRL's own loss forward."
        if same
        else "**The forward counts differ between the trainers** (see the table)."
    )
    for note in info.get("notes", []):
        lines += ["", note]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute): fewer repeats and steps")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved stock/trl_kl block pairs per regime")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per full-step block (x4 off-policy)")
    parser.add_argument("--loss-calls", type=int, default=None, help="timed _compute_loss calls per loss block")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's default. Default 1: the toy's kernels are too small to gain "
        "much from more, and on a shared machine multi-threaded kernels turn other processes' load into 10-100x stalls",
    )
    parser.add_argument("--model", choices=list(MODELS), default="toy", help="the policy (see the docstring)")
    parser.add_argument("--output", default="docs/performance.md", help="markdown file whose section is (re)written")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write --output")
    opts = parser.parse_args(argv)
    opts.repeats = opts.repeats or (3 if opts.quick else 30)
    opts.steps = opts.steps or (8 if opts.quick else 24)
    opts.loss_calls = opts.loss_calls or (10 if opts.quick else 20)
    opts.loss_warmup = 3
    if opts.steps % 4:
        parser.error("--steps must be a multiple of 4 (whole off-policy generation cycles)")
    default_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    info = machine()
    info["default_threads"] = default_threads
    info["load_start"] = info.pop("load") or (float("nan"),)
    info["command"] = "python benchmarks/grpo_overhead.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    COMMON.update(MODELS[opts.model]["config"])

    results, forwards, breakdowns, notes = {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = toy_model_path() if opts.model == "toy" else wide_model_path(tmp)
        print(f"# {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}; model {model_path}", flush=True)
        for regime in REGIMES:
            # forward counts (untimed)
            for name in TRAINERS:
                forwards[(regime, name)] = count_forwards(name, regime, model_path, tmp)
                print(f"{regime:10s} forwards {name:6s} {forwards[(regime, name)]}", flush=True)

            # full steps, interleaved, after one untimed block of each trainer (process-level warm-up)
            for name in TRAINERS:
                full_step_block(name, regime, model_path, 4, tmp)
            times = {name: [] for name in TRAINERS}
            tokens = {name: [] for name in TRAINERS}
            for rep in range(opts.repeats):
                order = list(TRAINERS) if rep % 2 == 0 else list(TRAINERS)[::-1]
                for name in order:
                    t, n = full_step_block(name, regime, model_path, opts.steps, tmp)
                    times[name].append(t)
                    tokens[name].append(n)
                print(
                    f"{regime:10s} full step rep {rep:2d}: stock {ms(times['stock'][-1])} ms, "
                    f"trl_kl {ms(times['trl_kl'][-1])} ms",
                    flush=True,
                )
            results[(regime, "full step")] = summarise(np.array(times["stock"]), np.array(times["trl_kl"]))
            if tokens["stock"] == tokens["trl_kl"]:
                notes.append(
                    f"Workload check ({regime}): every full-step block of both trainers processed the same number of "
                    f"tokens ({sorted(set(tokens['stock']))}), i.e. the same rollouts."
                )
            else:
                notes.append(
                    f"Note ({regime}): the tokens processed per full-step block differ between the trainers "
                    f"(stock {sorted(set(tokens['stock']))}, trl_kl {sorted(set(tokens['trl_kl']))})."
                )

            breakdowns[regime] = step_breakdown(regime, model_path, 2 * opts.steps, tmp)

            # loss forward + backward on a fixed batch, interleaved
            trainers = {name: build_trainer(name, regime, model_path, tmp) for name in TRAINERS}
            batch = fixed_batch(trainers["stock"], regime)
            for trainer in trainers.values():
                prepare_for_loss(trainer)
                loss_block(trainer, batch, opts.loss_warmup)
            blocks = {name: [] for name in TRAINERS}
            for rep in range(opts.repeats):
                order = list(TRAINERS) if rep % 2 == 0 else list(TRAINERS)[::-1]
                for name in order:
                    blocks[name].append(float(np.median(loss_block(trainers[name], batch, opts.loss_calls))))
            results[(regime, "loss fwd+bwd")] = summarise(np.array(blocks["stock"]), np.array(blocks["trl_kl"]))
            s = results[(regime, "loss fwd+bwd")]
            print(f"{regime:10s} loss fwd+bwd: stock {ms(s['stock'])} ms, trl_kl {ms(s['ours'])} ms", flush=True)
            del trainers
            gc.collect()

    info["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),)
    info["notes"] = notes
    section = render(opts, info, results, forwards, breakdowns, time.perf_counter() - started)
    print("\n" + section)
    if not opts.no_write:
        write_section(opts.output, MODELS[opts.model]["marker"], section, new_page=HEADER)
        print(f"\n# wrote {opts.output}")


if __name__ == "__main__":
    main()

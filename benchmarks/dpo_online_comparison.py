"""Offline DPO vs + SFT vs + resampling vs both, on the toy addition task: held-out correctness, same budget.

    TRL_KL_CACHE=/tmp/trl_kl_cache python benchmarks/dpo_online_comparison.py     # prints the table
    python benchmarks/dpo_online_comparison.py --write                               # and fills docs/dpo.md

Every variant starts from the same warm-started toy policy (``trl_kl.toy``) and trains the same number of
optimizer steps on batches of the same number of pairs, with the same learning rate and beta, from the same
offline preference data (``trl_kl.toy.offline_preferences``: chosen = the correct sum,
rejected = a uniformly drawn wrong number, i.e. data unlike the policy's own mistakes). Resampling variants
replace that data every ``--resample-every`` steps by best-vs-worst pairs of 4 completions of the policy per
prompt, labelled by ``correctness_reward + closeness_reward``; their extra cost is generation, visible in the
training's CPU time. Scores: greedy and sampled (temperature 1) correctness on held-out test-split prompts,
with ``toy.evaluate``. About 2 minutes of CPU (one thread); 4 minutes wall on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import mean_std, read_section, write_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "dpo.md"
SECTION = "dpo_online_comparison"  # its marked section of docs/dpo.md

DEFAULT = "default"
"""A variant field set to DEFAULT takes its value from the command line (--sft-weight, --resample-every)."""
HALF = "half"
"""resample_mix that makes about half of each window offline pairs: as many as the fresh ones (one per prompt)."""
VARIANTS = {
    "offline DPO": dict(),
    "+ SFT": dict(sft_weight=DEFAULT),
    "+ resampling": dict(resample_every=DEFAULT),
    "+ resampling + SFT": dict(resample_every=DEFAULT, sft_weight=DEFAULT),
    "+ resampling + SFT, offline pairs mixed in": dict(resample_every=DEFAULT, sft_weight=DEFAULT, resample_mix=HALF),
    "+ resampling, stale windows": dict(resample_every=32),
}


def run(variant: dict, seed: int, args, workdir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from trl_kl import DPOConfig, DPOTrainer, toy

    fields = {key: getattr(args, key) if value == DEFAULT else value for key, value in variant.items()}
    if fields.get("resample_mix") == HALF:
        fields["resample_mix"] = fields["resample_every"] * args.batch_size / args.train_size
    config = DPOConfig(
        output_dir=os.path.join(workdir, f"run-{seed}"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_steps=args.steps,
        seed=seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        resample_num_completions=4,
        resample_max_new_tokens=4,
        **fields,
    )
    torch.manual_seed(seed)
    path = toy.toy_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=toy.offline_preferences(args.train_size, seed=seed),
            processing_class=tokenizer,
            reward_funcs=[toy.correctness_reward, toy.closeness_reward] if config.resample_every else None,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.process_time()  # CPU time of this process: steadier than wall time on a shared machine
        trainer.train()
        seconds = time.process_time() - start
    held_out = toy.make_dataset(args.eval_size, seed=1000 + seed, split="test")
    greedy = toy.evaluate(trainer.model, tokenizer, held_out)["correctness"]
    sampled = toy.evaluate(trainer.model, tokenizer, held_out, num_samples=4, temperature=1.0, seed=seed)["correctness"]
    logs = [row for row in trainer.state.log_history if "resample/ess" in row]  # one row: the run's average
    ess = logs[-1]["resample/ess"] if logs else None
    return {"greedy": greedy, "sampled": sampled, "seconds": seconds, "ess": ess}


def baseline(seed: int, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_kl import toy

    path = toy.toy_model_path()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    held_out = toy.make_dataset(args.eval_size, seed=1000 + seed, split="test")
    greedy = toy.evaluate(model, tokenizer, held_out)["correctness"]
    sampled = toy.evaluate(model, tokenizer, held_out, num_samples=4, temperature=1.0, seed=seed)["correctness"]
    return {"greedy": greedy, "sampled": sampled, "seconds": 0.0, "ess": None}


def _cell(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: dict[str, list[dict]], args) -> str:
    lines = [
        "| variant | held-out correctness, greedy | held-out correctness, sampled (T=1) | mean `resample/ess` "
        "| train CPU time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        seconds = "-" if name == "initial policy" else _cell([r["seconds"] for r in runs], 1)
        ess = "-" if runs[0]["ess"] is None else _cell([r["ess"] for r in runs])
        greedy, sampled = _cell([r["greedy"] for r in runs]), _cell([r["sampled"] for r in runs])
        lines.append(f"| {name} | {greedy} | {sampled} | {ess} | {seconds} |")
    seeds = ", ".join(str(s) for s in args.seeds)
    lines += [
        "",
        f"Mean ± standard deviation over seeds {seeds}. Each run: {args.steps} optimizer steps of "
        f"{args.batch_size} pairs, learning rate {args.learning_rate} (constant), beta {args.beta}; "
        f"`sft_weight={args.sft_weight}`; `resample_every={args.resample_every}` (stale windows: 32), each refresh "
        f"sampling 4 completions for `resample_every` x {args.batch_size} prompts, so every resampling variant "
        f"generates the same number of completions; {args.train_size} offline pairs (mixed in: "
        f"`resample_mix={args.resample_every * args.batch_size / args.train_size:g}`, as many offline pairs as fresh "
        f"prompts in each window); "
        f"{args.eval_size} held-out prompts (4 samples each for the sampled column). Mean `resample/ess`: the "
        f"staleness ESS averaged over all training steps. "
        f"Generated by `python benchmarks/dpo_online_comparison.py --write`.",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--resample-every", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.relative_to(ROOT)}")
    parser.add_argument("--json", type=str, default=None, help="also dump the raw results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results = {"initial policy": [baseline(seed, args) for seed in args.seeds]}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.variants:
            results[name] = []
            for seed in args.seeds:
                result = run(VARIANTS[name], seed, args, workdir)
                results[name].append(result)
                print(f"{name:22s} seed {seed}: {json.dumps(result)}", file=sys.stderr, flush=True)
    text = table(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.write:
        if read_section(DOC, SECTION) is None:
            raise SystemExit(f"{DOC} has no {SECTION} section to fill")
        write_section(DOC, SECTION, text)
    return results


if __name__ == "__main__":
    main()

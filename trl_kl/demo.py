"""The main job: off-policy GRPO with the KL in the reward, on the offline toy task, in well under a minute on a CPU.

    python -m trl_kl.demo [--output_dir outputs/demo] [--max_steps 120] [--seed 0]

Trains the toy addition policy (``trl_kl.toy``, built and warm-started locally, no download) with
``trl_kl.GRPOTrainer``: k1 in the per-token reward carried as return-to-go (docs/theory.md#sequence-kl), each
rollout reused for ``num_iterations`` optimisation passes split over ``steps_per_generation`` steps (off-policy,
eq. 39), clip_std on the group normalisation (eq. 41). Shows a progress bar with one compact line per step above
it (the rollout's reward on the steps that generate, the sequence KL, the importance-sampling ESS and clip
fraction), then writes ``metrics.json`` and ``training.png`` (reward and KL over steps) into ``--output_dir``
and ends with a summary: held-out correctness before -> after.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging as transformers_logging

from . import toy
from .grpo import GRPOConfig, GRPOTrainer

COLUMNS = (("reward", "reward", "{:.3f}"), ("kl/seq_kl", "seq KL", "{:.4f}"), ("is/ess", "IS ESS", "{:.3f}"),
           ("is/clip_frac", "clip", "{:.3f}"))
"""(log key, label, format) of the line printed per step; blank where a step has no value (the reward is the
rollout's: logged only on the steps that generate, since one rollout feeds several steps off-policy)."""


def step_line(step: int, max_steps: int, logs: dict) -> str:
    """One compact line, e.g. ``step   5/120  reward 0.681  seq KL 0.0012  IS ESS 0.781  clip 0.248``."""
    fields = []
    for key, label, number in COLUMNS:
        text = f"{label} {number.format(logs[key])}" if key in logs else ""
        fields.append(f"{text:<{len(label) + 1 + len(number.format(0.0))}}")
    return f"step {step:>{len(str(max_steps))}}/{max_steps}  " + "  ".join(fields).rstrip()


class _ProgressAndRecord(TrainerCallback):
    """A progress bar over the optimizer steps, one ``step_line`` per logged step above it; keeps the logs."""

    def __init__(self):
        self.rows: list[dict] = []
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="training", unit="step", leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **logs})
            self.bar.write(step_line(state.global_step, state.max_steps, logs))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def demo_config(output_dir: str, max_steps: int, seed: int, **overrides) -> GRPOConfig:
    """The demo's settings: the paper's beta 0.04, off-policy reuse of each rollout, clip_std floor 0.1.
    ``overrides`` replace any field (the ablation benchmark varies the KL fields)."""
    settings = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        seed=seed,
        learning_rate=3e-4,
        per_device_train_batch_size=64,
        num_generations=8,
        steps_per_generation=2,  # one rollout of 128 completions feeds 2 optimizer steps...
        num_iterations=2,  # ...twice: 4 updates per rollout, so pi_old != pi_theta (importance sampling)
        max_completion_length=4,
        temperature=1.0,
        beta=0.04,
        kl_estimator="k1",
        kl_placement="reward",
        kl_reward_scope="return_to_go",
        clip_std_min=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast, slow and lossy on a CPU
        disable_tqdm=False,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def plot(rows: list[dict], path: Path) -> None:
    """Reward and sequence KL over steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    rollouts = [r for r in rows if "reward" in r]
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_r.plot([r["step"] for r in rollouts], [r["reward"] for r in rollouts], color="tab:blue")
    ax_r.set(xlabel="step", ylabel="mean reward (rollout)", title="reward")
    ax_kl.plot(steps, [r.get("kl/seq_kl", float("nan")) for r in rows], color="tab:red")
    ax_kl.set(xlabel="step", ylabel="sum_t log(pi_old/pi_ref)", title="sequence KL to the reference")
    for ax in (ax_r, ax_kl):
        ax.grid(alpha=0.3)
    fig.suptitle("trl_kl off-policy GRPO (k1 in the reward, return-to-go) on the toy task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(output_dir: str = "outputs/demo", max_steps: int = 120, seed: int = 0, **overrides) -> dict:
    """Train, evaluate on held-out prompts before and after, write metrics.json and training.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = toy.toy_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    held_out = toy.make_dataset(200, seed=seed, split="test")

    def held_out_scores(model):
        return toy.evaluate(model, tokenizer, held_out, num_samples=4, temperature=1.0, seed=seed)

    transformers_logging.disable_progress_bar()  # the bar of each checkpoint load: not what a reader watches
    before = held_out_scores(AutoModelForCausalLM.from_pretrained(model_path))
    recorder = _ProgressAndRecord()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(
            model=model_path,
            reward_funcs=[toy.correctness_reward, toy.closeness_reward],
            args=demo_config(str(out), max_steps, seed, **overrides),
            train_dataset=toy.make_dataset(2000, seed=seed, split="train"),
            processing_class=tokenizer,
            callbacks=[recorder],
        )
        for printer in (ProgressCallback, PrinterCallback):  # transformers' own bar and log dicts: ours replace them
            trainer.remove_callback(printer)
        trainer.train()
    after = held_out_scores(trainer.model)
    metrics = {
        "held_out_correctness_before": before["correctness"],
        "held_out_correctness_after": after["correctness"],
        "held_out_closeness_before": before["closeness"],
        "held_out_closeness_after": after["closeness"],
        "final_seq_kl": recorder.rows[-1].get("kl/seq_kl") if recorder.rows else None,
        "steps": max_steps,
        "log": recorder.rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot(recorder.rows, out / "training.png")
    print(
        f"wrote {out / 'metrics.json'} and {out / 'training.png'}\n"
        f"held-out correctness (sampled, T=1): {before['correctness']:.3f} -> {after['correctness']:.3f} after "
        f"{max_steps} steps; final sequence KL {metrics['final_seq_kl']:.4f}",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.environ.get("TRL_KL_DEMO_DIR", "outputs/demo"))
    parser.add_argument("--max_steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.output_dir, args.max_steps, args.seed)


if __name__ == "__main__":
    main()

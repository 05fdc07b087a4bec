"""The main job: off-policy GRPO with the KL in the reward, on the offline toy task, in well under a minute on a CPU.

    python -m trl_kl.demo [--output_dir outputs/demo] [--max_steps 120] [--seed 0]

Trains the toy addition policy (``trl_kl.toy``, built and warm-started locally, no download) with
``trl_kl.GRPOTrainer``: k1 in the per-token reward carried as return-to-go (NOTES §7), each rollout reused
for ``num_iterations`` optimisation passes split over ``steps_per_generation`` steps (off-policy, eq. 39),
clip_std on the group normalisation (eq. 41). Prints the KL and importance-sampling metrics per step (the
rollout's reward on the steps that generate), then writes
``metrics.json`` and ``training.png`` (reward and KL over steps) into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from . import toy
from .grpo import GRPOConfig, GRPOTrainer

PRINTED_KEYS = ("reward", "kl/seq_kl", "is/ess", "is/clip_frac")


class _PrintAndRecord(TrainerCallback):
    """Keeps the training logs and prints one line per optimizer step (the rollout's ``reward`` only on the steps
    that generate: off-policy, one rollout feeds several steps)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **logs})
            values = "  ".join(f"{k}={logs[k]:.4f}" for k in PRINTED_KEYS if k in logs)
            print(f"step {state.global_step:3d}  {values}", flush=True)


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

    before = held_out_scores(AutoModelForCausalLM.from_pretrained(model_path))
    recorder = _PrintAndRecord()
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
        f"held-out correctness (sampled, T=1): {before['correctness']:.3f} -> {after['correctness']:.3f}; "
        f"final sequence KL {metrics['final_seq_kl']:.4f}\nwrote {out / 'metrics.json'} and {out / 'training.png'}"
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

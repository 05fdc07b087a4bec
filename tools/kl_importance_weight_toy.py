"""A short toy run of ``kl_importance_weight`` "token" against "sequence" on stale rollouts: what the sequence
weight costs in effective sample size and gradient spread on a real (tiny) model. The numbers quoted in
docs/choosing.md.

    python tools/kl_importance_weight_toy.py                        # 2 settings x 2 weights x 2 seeds, ~1 min
    python tools/kl_importance_weight_toy.py --steps 10 --seeds 1   # a smoke run

The offline toy policy (``trl_kl.toy``, 3-token answers to additions) trains with GRPO, beta 0.3, each rollout
reused ``num_iterations`` times (``steps_per_generation=1``), at two settings: the off-policy benchmark's
(learning rate 1e-4, 4 updates per rollout) and an aggressive one (1e-3, 8 updates) where the policy moves far
from its rollout-time copy. Per run, over the logged steps: ``is/ess`` (mean and minimum), the largest
``is/seq_weight_max``, the gradient norm (mean and standard deviation over steps: the spread of the update), and,
over the last fifth of the run, the sequence KL of the sampling policy (``kl/seq_kl``) and the reward. Printed as
a markdown table, means over seeds. No vLLM here: the sampler is pi_old, so the weights are those of stale
rollouts only.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from dataclasses import dataclass

SETTINGS = {"moderate": (1e-4, 4), "aggressive": (1e-3, 8)}
"""name -> (learning_rate, num_iterations)."""


@dataclass
class Run:
    ess_mean: float
    ess_min: float
    weight_max: float
    grad_norm_mean: float
    grad_norm_std: float
    seq_kl: float
    reward: float


def train(weight: str, learning_rate: float, num_iterations: int, steps: int, seed: int, output_dir: str) -> Run:
    """One GRPO run on the toy policy; its ``Run`` statistics from the trainer's log history."""
    from transformers import PrinterCallback

    from trl_kl import GRPOConfig, GRPOTrainer
    from trl_kl.toy import closeness_reward, correctness_reward, make_dataset, toy_model_path

    args = GRPOConfig(
        output_dir=output_dir, beta=0.3, kl_importance_weight=weight, num_generations=8,
        per_device_train_batch_size=32, steps_per_generation=1, num_iterations=num_iterations,
        max_completion_length=4, max_steps=steps, learning_rate=learning_rate, seed=seed, logging_steps=1,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=toy_model_path(), reward_funcs=[correctness_reward, closeness_reward], args=args,
                          train_dataset=make_dataset(2000, seed=seed))
    trainer.remove_callback(PrinterCallback)  # stdout is the table
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "is/ess" in entry]
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    tail = max(1, len(logs) // 5)
    grad_norms = [entry["grad_norm"] for entry in logs]
    return Run(
        ess_mean=statistics.fmean(entry["is/ess"] for entry in logs),
        ess_min=min(entry["is/ess"] for entry in logs),
        weight_max=max(entry["is/seq_weight_max"] for entry in logs),
        grad_norm_mean=statistics.fmean(grad_norms),
        grad_norm_std=statistics.pstdev(grad_norms),
        seq_kl=statistics.fmean(entry["kl/seq_kl"] for entry in logs[-tail:]),
        reward=statistics.fmean(rewards[-max(1, len(rewards) // 5):]),
    )


def table(results: dict[tuple[str, str], list[Run]]) -> str:
    """Markdown: one row per (setting, weight), means over seeds."""
    head = (
        "| setting (lr, updates per rollout) | kl_importance_weight | is/ess mean (min) | max is/seq_weight_max | "
        "grad norm mean ± std over steps | sequence KL (last 20%) | reward (last 20%) |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for (setting, weight), runs in results.items():
        lr, iterations = SETTINGS[setting]

        def m(name: str) -> float:
            return statistics.fmean(getattr(r, name) for r in runs)

        lines.append(
            f"| {setting} ({lr:g}, {iterations}) | {weight} | {m('ess_mean'):.3f} ({min(r.ess_min for r in runs):.3f}) | "
            f"{max(r.weight_max for r in runs):.1f} | {m('grad_norm_mean'):.2f} ± {m('grad_norm_std'):.2f} | "
            f"{m('seq_kl'):.3f} | {m('reward'):.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)  # tiny model: threads cost more than they save
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for setting, (lr, iterations) in SETTINGS.items():
            for weight in ("token", "sequence"):
                results[setting, weight] = [train(weight, lr, iterations, args.steps, seed, output_dir)
                                            for seed in range(args.seeds)]
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

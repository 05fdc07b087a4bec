"""Print the numerical checks of the KL theory: exact gradients (on- and off-policy) and appendix D.

Command line::

    python -m trl_kl.verify                  # exact gradients on-policy: which KL form is right (~1 s)
    python -m trl_kl.verify --off-policy     # ... when the sampler is not the policy, and the trainer's options (~10 s)
    python -m trl_kl.verify --estimators     # appendix D: bias and spread of k1, k2, k3, k3_clip (~2 s)
    python -m trl_kl.verify --all            # all three

Each table is printed with a title, a legend of its columns and a one-line conclusion. The harnesses are
``trl_kl.exact_gradients`` and ``trl_kl.estimator_bias``; the docs that carry these tables with their
explanation (``docs/kl_gradient_bias.md``, ``docs/kl_estimators.md``) are written by ``tools/kl_tables.py``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from . import estimator_bias as eb
from . import exact_gradients as eg

OFF_POLICY_CHECKED = ("stale", "engine", "stale_engine", "engine_far")
"""The scenarios where the sampler covers pi_theta: an exact form must be exact in all of them."""


def onpolicy_conclusion(rows: Sequence[eg.BiasRow]) -> str:
    """One line: which on-policy forms give the sequence-KL gradient, which only the per-token one."""
    exact = [r.variant.name for r in rows if r.measured == "exact"]
    per_token = [r.variant.name for r in rows if r.measured == "exact per token only"]
    return (
        f"Conclusion: exact for the sequence KL: {', '.join(exact)}; exact per token only (T=1): "
        f"{', '.join(per_token)}; every other form is biased or has zero gradient."
    )


def offpolicy_conclusion(rows: Sequence[eg.OffPolicyRow]) -> str:
    """One line: which KL forms stay exact under every sampler that covers pi (stale, engine, both)."""
    exact = [r.form.name for r in rows if all(r.verdict(s) == "exact" for s in OFF_POLICY_CHECKED)]
    truncated = all(r.verdict("engine_top_p") != "exact" for r in rows)
    return (
        f"Conclusion: exact under stale rollouts and an engine mismatch: {'; '.join(exact)}. TRL's per-token "
        "ratio is not"
        + (", and no form is exact when the engine truncates (top-p)." if truncated else ".")
    )


def trainer_conclusion(rows: Sequence[eg.OffPolicyRow]) -> str:
    """One line: which of the trainer's configurations (``eg.TRAINER_CONFIGS``) are exact under every covering
    sampler."""
    exact = [c.label for c, r in zip(eg.TRAINER_CONFIGS, rows)
             if all(r.verdict(s) == "exact" for s in OFF_POLICY_CHECKED)]
    return (
        f"Conclusion: exact under stale rollouts and an engine mismatch: {'; '.join(exact)}; the default "
        "kl_importance_weight='token' is exact on the first step of a rollout only, at a lower variance."
    )


def _section(title: str, legend: str, table: str, conclusion: str) -> str:
    """A printed table: title, column legend, the markdown table, one line of conclusion."""
    return f"\n== {title} ==\n{legend}\n\n{table}\n{conclusion}\n"


ONPOLICY_LEGEND = (
    "Columns: placement / estimator / scope as in GRPOConfig; verdict = kl.SOUNDNESS; measured = what the exact\n"
    "enumeration shows; rel. error = ||E g - grad KL|| / ||grad KL|| with grad KL the gradient of the sequence-level\n"
    "KL(pi(y) || pi_ref(y)); T=1 = the one-token bandit; variance = E||g - E g||^2 of the single-sample gradient."
)

OFFPOLICY_LEGEND = (
    "Columns: form = placement/estimator/scope; policy ratio = TRL's importance_sampling_level (token, sequence =\n"
    "GSPO) or the exact sequence weight (sequence_product), with gradient (_grad) for the loss placement; sampler\n"
    "correction = TRL's vllm_importance_sampling_mode (<=cap: vllm_importance_sampling_clip_max); penalty from =\n"
    "the log-probs of the reward penalty (old = trainer's pi_old, current = pi_theta, sampler = the engine's q).\n"
    "Cells: 'exact' = E g equals the target on every seed; 'xc' = c times the target; '= e' = equals the same\n"
    "form's on-policy update, whose error is e; a number = mean relative error ||E g - target|| / ||target||.\n"
    "Target: grad KL(pi || pi_ref) for KL forms, -(1 - 1/G) grad E[R] for the reward term (group of G)."
)


TRAINER_LEGEND = (
    "Columns: a trl_kl.GRPOConfig (beta > 0, other fields at their defaults, vLLM with TRL's default correction:\n"
    "sequence_mask, cap 3), the harness form of its KL term (exact_gradients.trainer_form), the scenario cells as\n"
    "above, and the variance on-policy, in stale_engine and in engine_far."
)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the requested tables (default: the on-policy exact-gradient table)."""
    ap = argparse.ArgumentParser(prog="python -m trl_kl.verify", description=__doc__.split("\n")[0])
    ap.add_argument("--off-policy", action="store_true", help="exact gradients when the sampler is not the policy")
    ap.add_argument("--estimators", action="store_true", help="appendix D reproduction")
    ap.add_argument("--all", action="store_true", help="all tables")
    ap.add_argument("--V", type=int, default=3, help="vocabulary of the tabular policy")
    ap.add_argument("--T", type=int, default=3, help="sequence length of the tabular policy")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the gradient tables")
    ap.add_argument("--estimator-seeds", type=int, default=20, help="seeds of appendix D")
    args = ap.parse_args(argv)
    on_policy = args.all or not (args.off_policy or args.estimators)
    seeds = range(args.seeds)
    if on_policy:
        rows = eg.gradient_bias_table(args.V, args.T, seeds)
        title = f"Exact gradients on-policy: V={args.V}, T={args.T}, {args.seeds} seeds"
        print(_section(title, ONPOLICY_LEGEND, eg.format_gradient_table(rows, args.V, args.T), onpolicy_conclusion(rows)))
    if args.all or args.off_policy:
        print(_section("Off-policy scenarios: how the sampler q differs (exact statistics, mean over seeds)",
                       "Columns: pi_theta's mass q never samples; mean |log pi_old - log q| per token; ESS = "
                       "(E_q w)^2 / E_q w^2 of the weights to pi_theta,\nper sequence and per decision (prefix); the "
                       "q-mass TRL's default correction masks; the tokens outside the PPO clip.",
                       eg.format_scenarios(eg.all_scenario_stats(seeds=seeds, V=args.V, T=args.T)),
                       "Conclusion: the truncated engine loses mass no weight can restore although its ESS is ~1; "
                       "engine_far is where a cap of 3 binds."))
        kl_rows = eg.offpolicy_table(eg.KL_FORMS, seeds=seeds, V=args.V, T=args.T)
        truncation = eg.offpolicy_table(eg.TRUNCATION_FORMS, seeds=seeds, V=args.V, T=args.T)
        reward = eg.offpolicy_table(eg.REWARD_FORMS, seeds=seeds, V=args.V, T=args.T)
        title = f"Exact gradients off-policy: V={args.V}, T={args.T}, G={eg.DEFAULT_GROUP_SIZE}, {args.seeds} seeds"
        print(_section(title + ": KL forms (uncapped sampler corrections)", OFFPOLICY_LEGEND,
                       eg.format_offpolicy_table(kl_rows), offpolicy_conclusion(kl_rows)))
        print(_section(title + ": TRL's sampler correction modes at its default cap", "Columns: as above; the variance is for engine_far.",
                       eg.format_offpolicy_table(truncation, "engine_far"),
                       "Conclusion: a cap that binds (engine_far) biases every mode; token-level modes are biased "
                       "even when it does not."))
        print(_section(title + ": the reward term", "Columns: as above.", eg.format_offpolicy_table(reward),
                       "Conclusion: the sequence weight keeps the policy gradient of the reward exact; TRL's per-token "
                       "ratio does not once the rollout is stale."))
        trainer = eg.offpolicy_table([eg.trainer_form(c) for c in eg.TRAINER_CONFIGS], seeds=seeds, V=args.V, T=args.T)
        print(_section(title + ": the trainer's options (kl_importance_weight)", TRAINER_LEGEND,
                       eg.format_trainer_table(eg.TRAINER_CONFIGS, trainer), trainer_conclusion(trainer)))
    if args.all or args.estimators:
        est = eb.appendix_d_table(10_000, range(args.estimator_seeds))
        print(_section(f"Appendix D: KL(q || p), q = N(0.1, 0.2), p = N(0, 1), 10,000 samples, "
                       f"{args.estimator_seeds} seeds",
                       "Columns: bias = (mean - KL) / KL and std / KL of kl.estimate over the samples, per seed; "
                       "paper = the paper's one run; population = the n -> infinity value (quadrature).",
                       eb.format_estimator_table(est),
                       "Conclusion: k1 is unbiased with a stable spread; k2 and k3_clip are biased; k3 is unbiased "
                       "but its infinite variance makes a typical run read low (see the tail table below)."))
        tail = eb.format_k3_tail_table((10_000, 1_000_000), range(args.estimator_seeds))
        print(_section("k3's typical bias against the sample size",
                       "Columns: k3's bias / KL over seeds; reach heuristic = the p-mass n samples of q can see, minus 1, "
                       "over KL.",
                       tail, "Conclusion: the typical bias of k3 shrinks only logarithmically with the sample size."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

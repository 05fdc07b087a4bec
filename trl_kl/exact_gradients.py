"""Exact expected gradients of the trainer's KL and reward surrogates on a tabular policy, on-policy and when
the sampler is not the policy (docs/theory.md#sequence-kl, docs/theory.md#sampler-mismatch).

A tabular autoregressive policy (one vector of ``V`` logits per prefix) is small enough to enumerate every
sequence of length ``T``. So the targets (the gradient of the sequence-level KL(pi(y) || pi_ref(y)), of the
expected reward E_pi[R(y)]) and the *expected* update E_{y~q}[g(y)] of each surrogate the trainer can form are
computed exactly, with no sampling noise, for any sampler q.

Four distributions take part (``trl_kl.importance``): pi_theta (the trained logits, with gradient), pi_old (the
trainer's copy at rollout time), q (the sampler: pi_old, a perturbed "engine" copy of it, possibly top-k/top-p
truncated) and pi_ref. ``SCENARIOS`` names the cases: on-policy, stale rollouts (pi_old != pi_theta), an engine
mismatch (q != pi_old), a truncated engine, and both.

Every per-sample surrogate is built from the functions the trainer itself calls, never from a second copy
of a formula: ``kl.reward_penalty``, ``kl.kl_shaped_advantages`` (the scopes), ``kl.kl_loss`` / ``kl.full_kl``,
``advantages.group_normalized_advantages`` (groups of ``G`` completions, enumerated), and for the importance
weights ``importance.policy_ratio``, ``importance.sampler_correction``, ``importance.clipped_surrogate_loss``
(TRL 1.16's formulas) and the exact sequence weights of ``importance``. ``Form`` describes one surrogate:
placement x estimator x reward scope x policy ratio (TRL's ``importance_sampling_level`` or the exact sequence
weight) x sampler correction (TRL's ``vllm_importance_sampling_mode`` and cap) x where the penalty's log-probs
come from x PPO clip. ``evaluate`` returns the exact mean and variance of its single-sample gradient.

``trainer_form`` gives the form ``trl_kl.GRPOTrainer`` trains with for a config (``TRAINER_CONFIGS``: the trainer
table, both settings of ``kl_importance_weight``).

The printed tables are in ``trl_kl.verify`` (``python -m trl_kl.verify``); the docs are written by
``tools/kl_tables.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from . import importance, kl
from .advantages import group_normalized_advantages

# ===================================================================================================
# Enumeration of a tabular policy
# ===================================================================================================


@contextlib.contextmanager
def single_thread():
    """Run tiny-tensor work on one intra-op thread, then restore the previous count. On a busy 2-core
    machine torch's thread pool makes a 13x3 ``log_softmax`` take ~10 ms instead of ~2 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class TabularPolicy:
    """A tabular autoregressive policy and its reference, fully enumerated (docs/theory.md#sequence-kl).

    States are the prefixes of length 0 .. T-1 (``num_states = V^0 + ... + V^(T-1)``); each state has
    its own vector of ``V`` logits. ``logits`` (the trained parameters, float64, ``requires_grad``) and
    ``ref_logits`` (frozen) are ``(num_states, V)``. ``tokens`` ``(N, T)`` lists all ``N = V^T``
    sequences, ``states`` ``(N, T)`` the state index of each token's prefix, ``mask`` ``(N, T)`` is
    all ones (every sequence has exactly ``T`` tokens).
    """

    V: int
    T: int
    logits: torch.Tensor
    ref_logits: torch.Tensor
    tokens: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor

    @property
    def num_states(self) -> int:
        return self.logits.shape[0]


def num_states(V: int, T: int) -> int:
    """Number of prefixes (states) of a length-``T`` tabular policy: V^0 + V^1 + ... + V^(T-1)."""
    return sum(V**t for t in range(T))


def enumerate_sequences(V: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``V^T`` sequences and their prefix states.

    Returns ``tokens`` ``(N, T)`` (lexicographic order) and ``states`` ``(N, T)``: the state of token
    ``t`` is the prefix ``y[:t]``, indexed ``offset_t + sum_i y_i V^(t-1-i)`` with
    ``offset_t = V^0 + ... + V^(t-1)`` (so the empty prefix is state 0).
    """
    if V < 1 or T < 1:
        raise ValueError(f"need V >= 1 and T >= 1, got V={V}, T={T}")
    tokens = torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long).reshape(-1, T)
    states = torch.zeros_like(tokens)
    code = torch.zeros(tokens.shape[0], dtype=torch.long)
    for t in range(T):
        states[:, t] = num_states(V, t) + code
        code = code * V + tokens[:, t]
    return tokens, states


def make_tabular(V: int, T: int, seed: int, scale: float = 1.0) -> TabularPolicy:
    """A random tabular policy and an independent random reference: logits ``scale * N(0, 1)`` per state,
    float64, drawn from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    S = num_states(V, T)
    logits = (scale * torch.randn(S, V, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref_logits = scale * torch.randn(S, V, generator=gen, dtype=torch.float64)
    tokens, states = enumerate_sequences(V, T)
    mask = torch.ones(tokens.shape, dtype=torch.float64)
    return TabularPolicy(V, T, logits, ref_logits, tokens, states, mask)


def _gather(log_probs: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_probs[states[n, t], tokens[n, t]]``: per-token log-probs ``(N, T)`` from a ``(S, V)`` table."""
    return log_probs[states].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_log_probs(policy: TabularPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of every enumerated sequence: ``logp[y, t] = log pi(y_t | y_<t)`` (with
    gradient w.r.t. ``policy.logits``) and ``ref_logp[y, t]`` (no gradient), both ``(N, T)``
    (the ``logps`` / ``ref_logps`` convention of ``kl.py``)."""
    logp = _gather(torch.log_softmax(policy.logits, -1), policy.states, policy.tokens)
    return logp, _gather(torch.log_softmax(policy.ref_logits, -1), policy.states, policy.tokens)


def sequence_kl(policy: TabularPolicy) -> torch.Tensor:
    """Sequence-level KL(pi(y) || pi_ref(y)) = sum_y p(y) sum_t (log pi - log pi_ref)
    (docs/theory.md#sequence-kl), exact, differentiable in ``policy.logits``."""
    logp, ref_logp = token_log_probs(policy)
    p = logp.sum(-1).exp()
    return (p * (logp - ref_logp).sum(-1)).sum()


def exact_kl_gradient(policy: TabularPolicy) -> torch.Tensor:
    """The KL target: grad of the sequence KL w.r.t. the policy logits, by autograd through the exact
    enumeration (the probabilities p(y) are differentiated too). Flat ``(num_states * V,)``."""
    (g,) = torch.autograd.grad(sequence_kl(policy), policy.logits)
    return g.reshape(-1)


def sequence_probs(policy: TabularPolicy) -> torch.Tensor:
    """p(y) = exp(sum_t log pi(y_t|y_<t)) for every enumerated sequence, detached, ``(N,)``; sums to 1."""
    with torch.no_grad():
        logp, _ = token_log_probs(policy)
        return logp.sum(-1).exp()


def max_ref_ratio(policy: TabularPolicy) -> float:
    """max over states and tokens of r = pi_ref(a|s) / pi(a|s): above ``kl.DEFAULT_K3_CLIP_MAX`` (10)
    k3_clip differs from k3 (appendix D's clamp)."""
    with torch.no_grad():
        lr = torch.log_softmax(policy.ref_logits, -1) - torch.log_softmax(policy.logits, -1)
        return float(lr.max().exp())


def relative_error(g: torch.Tensor, target: torch.Tensor) -> float:
    """||g - target|| / ||target||, the figure of merit of every table."""
    return float((g - target).norm() / target.norm())


# ===================================================================================================
# The sampler: stale rollouts, a mismatched engine, truncation
# ===================================================================================================


@dataclass(frozen=True)
class Scenario:
    """How the rollout's distributions differ from pi_theta (whose logits are ``make_tabular``'s, so every
    scenario of a seed has the same targets). ``stale``: pi_old's logits are pi_theta's minus
    ``stale * N(0, 1)`` (pi_theta is pi_old after some optimizer steps). ``engine``: q's logits are pi_old's
    plus ``engine * N(0, 1)`` (an inference engine whose log-probs differ). ``top_k`` / ``top_p``: q is
    truncated to them and renormalised (vLLM's processed log-probs, which TRL requires)."""

    name: str
    stale: float = 0.0
    engine: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    description: str = ""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("on_policy", description="q = pi_old = pi_theta"),
        Scenario("stale", stale=0.3, description="q = pi_old, pi_theta = pi_old + steps (logits +0.3 N(0,1))"),
        Scenario("engine", engine=0.3, description="pi_old = pi_theta, q = engine (logits +0.3 N(0,1))"),
        Scenario("engine_top_p", top_p=0.9, description="pi_old = pi_theta, q = pi_old truncated to top-p 0.9"),
        Scenario("stale_engine", stale=0.3, engine=0.3, description="stale and engine together"),
        Scenario("engine_far", engine=1.0, description="pi_old = pi_theta, q = engine (logits +1.0 N(0,1))"),
    )
}
"""The scenarios of the off-policy tables. ``engine_far`` is the one where TRL's default cap (3) on the
sequence correction binds."""

DEFAULT_GROUP_SIZE = 3
"""Completions per prompt (``num_generations``) of the enumerated groups: every G-tuple is enumerated."""


def truncated_log_probs(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """log-softmax of ``logits`` ``(S, V)`` restricted to the top-k tokens and to the smallest set whose
    probability reaches ``top_p`` (the most likely token always kept), renormalised; ``-inf`` elsewhere: what
    vLLM samples from and reports as processed log-probs."""
    logp = torch.log_softmax(logits, -1)
    keep = torch.ones_like(logp, dtype=torch.bool)
    order = logp.argsort(-1, descending=True)
    rank = order.argsort(-1)  # rank 0 = most likely
    if top_k is not None:
        keep &= rank < top_k
    if top_p is not None:
        sorted_p = logp.gather(-1, order).exp()
        before = (sorted_p.cumsum(-1) - sorted_p).gather(-1, rank)  # mass of the more likely tokens
        keep &= before < top_p
    return torch.log_softmax(logp.masked_fill(~keep, -math.inf), -1)


@dataclass
class SamplerSetup:
    """pi_theta and pi_ref (``policy``), pi_old (``old_logits``), the sampler's per-state log-probs
    ``sampler_log_probs`` (``(S, V)``, ``-inf`` outside a truncation), and a tabular reward ``reward`` ``(N,)``
    in {0, 1} (a verifiable reward: groups of equal rewards occur)."""

    policy: TabularPolicy
    old_logits: torch.Tensor
    sampler_log_probs: torch.Tensor
    reward: torch.Tensor
    scenario: Scenario


def _noise(seed: int, shape, salt: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1_000_003 * salt + seed), dtype=torch.float64)


def make_setup(V: int, T: int, seed: int, scenario: Scenario | str, scale: float = 1.0) -> SamplerSetup:
    """The instance of ``scenario`` for a seed: pi_theta and pi_ref are ``make_tabular(V, T, seed, scale)``'s,
    the perturbations and the reward have their own seeded streams."""
    scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    policy = make_tabular(V, T, seed, scale)
    theta = policy.logits.detach()
    old = theta - scenario.stale * _noise(seed, theta.shape, 1)
    sampler = truncated_log_probs(old + scenario.engine * _noise(seed, theta.shape, 2), scenario.top_k, scenario.top_p)
    reward = (torch.rand(V**T, generator=torch.Generator().manual_seed(1_000_003 * 3 + seed), dtype=torch.float64)
              < 0.5).double()
    return SamplerSetup(policy, old, sampler, reward, scenario)


def on_policy_setup(policy: TabularPolicy, reward: torch.Tensor | None = None) -> SamplerSetup:
    """q = pi_old = pi_theta (the on-policy harness); ``reward`` defaults to 0."""
    theta = policy.logits.detach()
    reward = torch.zeros(policy.tokens.shape[0], dtype=torch.float64) if reward is None else reward
    return SamplerSetup(policy, theta, torch.log_softmax(theta, -1), reward, SCENARIOS["on_policy"])


@dataclass
class Rollout:
    """Per-token tensors of every sequence in the sampler's support, ``(N, T)``: ``logp`` (pi_theta, with
    gradient), ``old`` (pi_old), ``sampling`` (q), ``ref`` (pi_ref); ``mask``; ``q`` ``(N,)`` = q(y);
    ``states``/``tokens``; ``reward`` ``(N,)``; ``missing`` = pi_theta's mass outside q's support;
    ``logits``/``ref_logits`` ``(S, V)``, the tables (for the exact KL over the vocabulary)."""

    logp: torch.Tensor
    old: torch.Tensor
    sampling: torch.Tensor
    ref: torch.Tensor
    mask: torch.Tensor
    q: torch.Tensor
    states: torch.Tensor
    tokens: torch.Tensor
    reward: torch.Tensor
    missing: float
    logits: torch.Tensor
    ref_logits: torch.Tensor


def rollout(setup: SamplerSetup) -> Rollout:
    """The sequences q can draw, with every distribution's per-token log-probs (``kl.py``'s conventions)."""
    pol = setup.policy
    with torch.no_grad():
        sampling_all = _gather(setup.sampler_log_probs, pol.states, pol.tokens)
        support = torch.isfinite(sampling_all).all(-1)
        p_all = sequence_probs(pol)
    states, tokens = pol.states[support], pol.tokens[support]
    logp = _gather(torch.log_softmax(pol.logits, -1), states, tokens)
    return Rollout(
        logp=logp,
        old=_gather(torch.log_softmax(setup.old_logits, -1), states, tokens),
        sampling=sampling_all[support],
        ref=_gather(torch.log_softmax(pol.ref_logits, -1), states, tokens),
        mask=pol.mask[support],
        q=sampling_all[support].sum(-1).exp(),
        states=states,
        tokens=tokens,
        reward=setup.reward[support],
        missing=float(p_all[~support].sum()),
        logits=pol.logits,
        ref_logits=pol.ref_logits,
    )


def exact_reward_gradient(setup: SamplerSetup) -> torch.Tensor:
    """The reward target: grad of E_{y~pi_theta}[R(y)] w.r.t. the logits, by autograd through the enumeration."""
    logp, _ = token_log_probs(setup.policy)
    (g,) = torch.autograd.grad((logp.sum(-1).exp() * setup.reward).sum(), setup.policy.logits)
    return g.reshape(-1)


def conditional_advantages(
    rewards: torch.Tensor, probs: torch.Tensor, group_size: int, scale: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """E[A_1 | y_1 = y] and E[A_1^2 | y_1 = y], ``(N,)`` each, where A is
    ``advantages.group_normalized_advantages`` (the trainer's function, with its ``scale``) of a group of
    ``group_size`` completions whose other members are drawn i.i.d. from ``probs`` and ``rewards[y]`` is each
    member's scalar reward. Exact: all ``N^group_size`` groups are enumerated."""
    key = (rewards.numpy().tobytes(), probs.numpy().tobytes(), group_size, scale)
    if key not in _ADVANTAGE_CACHE:
        if len(_ADVANTAGE_CACHE) > 256:
            _ADVANTAGE_CACHE.clear()
        _ADVANTAGE_CACHE[key] = _conditional_advantages(rewards, probs, group_size, scale)
    return _ADVANTAGE_CACHE[key]


_ADVANTAGE_CACHE: dict = {}


def _conditional_advantages(rewards, probs, group_size, scale):
    n = rewards.shape[0]
    groups = torch.cartesian_prod(*[torch.arange(n)] * group_size).reshape(-1, group_size)  # first member slowest
    adv = group_normalized_advantages(rewards[groups].reshape(-1), group_size, scale).view(-1, group_size)[:, 0]
    mates = probs[groups[: n ** (group_size - 1), 1:]].prod(-1)  # the same list of mates for every y_1
    adv = adv.view(n, -1)
    return adv @ mates, (adv * adv) @ mates


# ===================================================================================================
# The surrogates the trainer can form
# ===================================================================================================

REWARD_PLACEMENT_RATIOS = ("token", "sequence", "sequence_product", "per_decision", "kl_sequence")
"""Policy-side factor of the reward placement's per-token surrogate: TRL's ``coef_1`` per token or per
sequence (GSPO), the exact sequence weight pi_theta(y)/pi_old(y) with a per-token gradient
(``importance.sequence_weight_per_token``), or per-decision weights pi_theta(y_<=t)/q(y_<=t) on each
penalty (``importance.prefix_weights``; the KL term only, and the whole correction to q). ``kl_sequence``: the
trainer's ``kl_importance_weight="sequence"`` term, ``importance.sequence_weighted_penalty`` (the whole weight
pi_theta(y)/q(y) from q's log-probs, no clip, no sampler correction, the current policy's penalty)."""

LOSS_PLACEMENT_RATIOS = (
    "none", "token", "token_grad", "sequence_grad", "sequence_product", "sequence_product_grad", "kl_sequence"
)
"""The ``importance_ratio`` given to ``kl.kl_loss``: none, pi_theta/pi_old per token detached (the trainer's
loss placement) or with gradient (``use_bias_correction_kl``, TRL's own KL), TRL's GSPO ratio with gradient
(TRL's own KL with ``importance_sampling_level="sequence"``), the sequence weight pi_theta(y)/pi_old(y)
detached or with gradient (``importance.sequence_weight``). ``kl_sequence``: the trainer's
``kl_importance_weight="sequence"`` term, ``importance.sequence_weighted_kl_loss`` (pi_theta(y)/q(y) from q's
log-probs, with its gradient for k1 and k3, detached otherwise)."""


@dataclass(frozen=True)
class Form:
    """One surrogate of the trainer, evaluated on one sampled sequence (a row of the off-policy table).

    ``term``: ``"kl"`` (target grad KL) or ``"reward"`` (target: the policy gradient of E[R]).
    ``placement``/``estimator``: as ``GRPOConfig``; the reward placement also accepts ``"k3_value"`` (the k3
    value as the penalty, an ablation). ``scope``: ``kl.REWARD_SCOPES`` or ``"sequence_prenorm"`` (the summed
    penalty subtracted from the scalar reward *before* group normalisation, as ``GRPOTrainer._advantages``
    does today); ``"-"`` for a loss. ``ratio``: ``REWARD_PLACEMENT_RATIOS`` / ``LOSS_PLACEMENT_RATIOS``.
    ``correction``/``cap``: TRL's sampler correction (``"none"`` or ``importance.SAMPLER_CORRECTION_MODES``;
    ``cap`` = ``vllm_importance_sampling_clip_max``, None = no bound). ``penalty_from``: the log-probs the
    reward penalty is formed from, ``"old"`` (the trainer's pi_old), ``"sampler"`` (q's, the engine's) or
    ``"current"`` (pi_theta's, detached). ``ppo_clip``: TRL's epsilon (None: the clip never binds).
    ``scale``: ``scale_rewards`` of the group normalisation (reward term and ``sequence_prenorm``)."""

    placement: str = "reward"
    estimator: str = "k1"
    scope: str = "return_to_go"
    ratio: str = "token"
    correction: str = "none"
    cap: float | None = None
    penalty_from: str = "old"
    ppo_clip: float | None = None
    term: str = "kl"
    scale: str = "group"

    def __post_init__(self):
        ratios = REWARD_PLACEMENT_RATIOS if self.placement == "reward" else LOSS_PLACEMENT_RATIOS
        if self.placement not in kl.PLACEMENTS or self.ratio not in ratios:
            raise ValueError(f"placement {self.placement!r} takes a ratio in {ratios}, got {self.ratio!r}")
        if self.correction != "none" and self.correction not in importance.SAMPLER_CORRECTION_MODES:
            raise ValueError(f"correction must be 'none' or one of {importance.SAMPLER_CORRECTION_MODES}")
        if self.ratio == "per_decision" and (self.correction != "none" or self.scope != "return_to_go"):
            raise ValueError("per-decision weights correct to q themselves and carry a return-to-go penalty")
        if self.term == "reward" and (self.placement != "reward" or self.ppo_clip is not None):
            raise ValueError("the reward term is the reward placement's advantage, evaluated without the PPO clip")
        if self.ratio == "kl_sequence" and (
            self.term != "kl" or self.correction != "none" or self.ppo_clip is not None
            or self.scope == "sequence_prenorm" or (self.placement == "reward" and self.penalty_from != "current")
        ):
            raise ValueError(
                "kl_sequence is the trainer's kl_importance_weight='sequence' KL term: its weight corrects to q itself "
                "(no sampler correction), outside the PPO clip, with the current policy's penalty"
            )

    @property
    def name(self) -> str:
        """A compact unique label, e.g. ``reward/k1/return_to_go ratio=token corr=sequence_mask<=3``."""
        what = f"{self.placement}/{self.estimator}" + (f"/{self.scope}" if self.placement == "reward" else "")
        if self.term == "reward":
            what = f"reward term (scale_rewards={self.scale})"
        elif self.scope == "sequence_prenorm":
            what += f" (scale_rewards={self.scale})"
        parts = [what, f"ratio={self.ratio}", f"corr={self.correction_label}"]
        if self.placement == "reward" and self.term == "kl" and self.penalty_from != "old":
            parts.append(f"penalty={self.penalty_from}")
        if self.ppo_clip is not None:
            parts.append(f"clip={self.ppo_clip:g}")
        return " ".join(parts)

    @property
    def correction_label(self) -> str:
        if self.correction == "none":
            return "none"
        return self.correction + ("" if self.cap is None else f"<={self.cap:g}")


def _penalty(r: Rollout, form: Form) -> torch.Tensor:
    """The per-token reward penalty, from the log-probs ``form.penalty_from`` names (``kl.reward_penalty``)."""
    source = {"old": r.old, "sampler": r.sampling, "current": r.logp.detach()}[form.penalty_from]
    if form.estimator == "k3_value":
        return kl.estimate("k3", source, r.ref)
    return kl.reward_penalty(form.estimator, source, r.ref)


def _sampler_factor(r: Rollout, form: Form) -> torch.Tensor | float:
    if form.correction == "none":
        return 1.0
    return importance.sampler_correction(r.old, r.sampling, r.mask, form.correction, None, form.cap)


def per_sample_loss(r: Rollout, form: Form, shaped: torch.Tensor | None = None) -> torch.Tensor:
    """The loss the trainer differentiates for each sampled sequence, ``(N,)``, summed over its tokens
    (with every completion of length T, TRL's ``loss_type`` normalisers are constants).

    Reward placement: TRL's per-token loss ``importance.clipped_surrogate_loss(coef_1, R_hat, eps, eps)``
    times the sampler correction, where ``R_hat`` is the KL part of the shaped advantage with beta = 1
    (``kl.kl_shaped_advantages(0, penalty, mask, 1, scope)``), or ``shaped`` when given (the reward term's
    conditional advantage, the ``sequence_prenorm`` KL part). Loss placement: ``kl.kl_loss`` (``kl.full_kl``
    for ``full``) with the ``importance_ratio`` of ``form.ratio`` times the sampler correction. So for a KL
    row the expected gradient is to be compared with +grad KL, for the reward term with -grad E[R]."""
    mask, corr = r.mask, _sampler_factor(r, form)
    if form.ratio == "kl_sequence":  # the trainer's kl_importance_weight="sequence" term, its own functions
        if form.placement == "reward":
            per_token = importance.sequence_weighted_penalty(_penalty(r, form), r.logp, r.sampling, mask, form.scope)
        else:
            per_token = importance.sequence_weighted_kl_loss(form.estimator, _kl_per_token(r, form), r.logp,
                                                             r.sampling, mask)
        return (per_token * mask).sum(-1)
    if form.placement == "reward":
        if shaped is None:
            penalty = _penalty(r, form)
            if form.ratio == "per_decision":
                penalty = importance.prefix_weights(r.logp, r.sampling, mask) * penalty
            shaped = kl.kl_shaped_advantages(torch.zeros_like(penalty[:, 0]), penalty, mask, 1.0, form.scope)
        if form.ratio in importance.IMPORTANCE_SAMPLING_LEVELS:
            coef = importance.policy_ratio(r.logp, r.old, mask, form.ratio)
        elif form.ratio == "sequence_product":
            coef = importance.sequence_weight_per_token(r.logp, r.old, mask)
        else:  # per_decision: the penalty carries the weights; the ratio is 1 with gradient grad log pi
            coef = torch.exp(r.logp - r.logp.detach())
        eps = math.inf if form.ppo_clip is None else form.ppo_clip
        per_token = importance.clipped_surrogate_loss(coef, shaped, eps, eps) * corr
        return (per_token * mask).sum(-1)
    ratio = _loss_ratio(r, form.ratio)
    if form.estimator == "full":
        per_token = _kl_per_token(r, form)
        per_token = per_token if ratio is None else per_token * ratio
    else:
        per_token = kl.kl_loss(form.estimator, r.logp, r.ref, importance_ratio=ratio)
    return (per_token * corr * mask).sum(-1)


def _kl_per_token(r: Rollout, form: Form) -> torch.Tensor:
    """The loss placement's per-token KL, differentiable: ``kl.estimate``, or for ``full`` the exact per-state KL
    (an expectation over the token) at each visited state, ``kl.full_kl``."""
    if form.estimator == "full":
        return kl.full_kl(r.logits[r.states], r.ref_logits[r.states])
    return kl.estimate(form.estimator, r.logp, r.ref)


CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""TRL's loss types whose per-token loss is ``importance.clipped_surrogate_loss``, the surrogate ``Form`` evaluates."""


def trainer_form(config) -> Form:
    """The ``Form`` of the KL term ``trl_kl.GRPOTrainer`` trains with ``config``: a ``trl_kl.GRPOConfig``, or any
    object with its field names (``TrainerConfig``). The KL forms of the tables are the trainer's when built here:
    ``tests/test_grpo_vllm.py`` checks, on the trainer's own micro-batches, that its loss equals ``per_sample_loss``
    of this form.

    * ``kl_importance_weight="token"``, reward placement: the penalty of pi_old (eq. 39) in the advantage, under
      TRL's ``importance_sampling_level`` ratio, its PPO clip (``epsilon``) and, with ``use_vllm``, its sampler
      correction (``vllm_importance_sampling_mode``, ``vllm_importance_sampling_clip_max``);
    * loss placement: the per-token ratio (``token``; ``token_grad`` with ``use_bias_correction_kl``; none for
      ``full``) times the same sampler correction;
    * ``"sequence"``: ``kl_sequence`` (whatever TRL's ratio, clip and correction, which act on the reward's
      advantage only).

    Raises for what ``Form`` cannot express: a lower bound on the sampler correction, asymmetric or two-sided
    clipping, a loss type outside ``CLIPPED_LOSS_TYPES`` with the KL in the advantage."""
    estimator, placement = config.kl_estimator, config.kl_placement
    if config.kl_importance_weight == "sequence":
        if placement == "reward":
            return Form("reward", estimator, config.kl_reward_scope, "kl_sequence", penalty_from="current")
        return Form("loss", estimator, "-", "kl_sequence")
    correction, cap = "none", None
    if config.use_vllm and config.vllm_importance_sampling_correction:
        if config.vllm_importance_sampling_clip_min is not None:
            raise ValueError("the harness's sampler correction has an upper bound only")
        correction, cap = config.vllm_importance_sampling_mode, config.vllm_importance_sampling_clip_max
    if placement == "loss":
        ratio = "none" if estimator == "full" else "token_grad" if config.use_bias_correction_kl else "token"
        return Form("loss", estimator, "-", ratio, correction, cap)
    high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    if high != config.epsilon or config.delta is not None or config.loss_type not in CLIPPED_LOSS_TYPES:
        raise ValueError("the harness's PPO clip is symmetric, without delta, for the clipped-surrogate loss types")
    return Form("reward", estimator, config.kl_reward_scope, config.importance_sampling_level, correction, cap,
                "old", config.epsilon)


@dataclass(frozen=True)
class TrainerConfig:
    """The fields of ``trl_kl.GRPOConfig`` that decide the trainer's KL term (``trainer_form``), with their
    defaults, except ``use_vllm=True``: the rollout comes from an engine with TRL's default correction
    (``sequence_mask``, cap 3), which changes nothing where the sampler is pi_old (on-policy, stale)."""

    kl_importance_weight: str = "token"
    kl_estimator: str = "k1"
    kl_placement: str = "reward"
    kl_reward_scope: str = "return_to_go"
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    use_vllm: bool = True
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dr_grpo"

    @property
    def label(self) -> str:
        """The config as the non-default GRPOConfig fields that name it, e.g.
        ``kl_placement="loss", kl_estimator="k2"``."""
        default = TrainerConfig()
        names = ("kl_importance_weight", "kl_placement", "kl_estimator", "kl_reward_scope",
                 "importance_sampling_level", "use_bias_correction_kl")
        shown = {"kl_estimator"} if self.kl_placement == "loss" else set()
        changed = [f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n) != getattr(default, n) or n in shown]
        return ", ".join(changed) or "defaults"


TRAINER_CONFIGS: tuple[TrainerConfig, ...] = (
    TrainerConfig(),
    TrainerConfig("sequence"),
    TrainerConfig(kl_reward_scope="sequence"),
    TrainerConfig("sequence", kl_reward_scope="sequence"),
    TrainerConfig(kl_reward_scope="token"),
    TrainerConfig("sequence", kl_reward_scope="token"),
    TrainerConfig(kl_reward_scope="sequence", importance_sampling_level="sequence"),
    TrainerConfig(kl_estimator="k2", kl_placement="loss"),
    TrainerConfig("sequence", kl_estimator="k2", kl_placement="loss"),
    TrainerConfig(kl_estimator="full", kl_placement="loss"),
    TrainerConfig("sequence", kl_estimator="full", kl_placement="loss"),
    TrainerConfig("sequence", kl_estimator="k1", kl_placement="loss"),
    TrainerConfig("sequence", kl_estimator="k3", kl_placement="loss"),
    TrainerConfig(kl_estimator="k3", kl_placement="loss", use_bias_correction_kl=True),
)
"""Rows of the trainer table of docs/kl_gradient_bias.md: the two ``kl_importance_weight`` settings for the
configurations the trainer accepts without ``allow_unsound_kl``."""


def _loss_ratio(r: Rollout, ratio: str) -> torch.Tensor | None:
    """The ``importance_ratio`` of the loss placement (``LOSS_PLACEMENT_RATIOS``), pi_theta to pi_old."""
    if ratio == "none":
        return None
    if ratio in ("token", "token_grad"):
        rho = importance.policy_ratio(r.logp, r.old, r.mask)
    elif ratio == "sequence_grad":
        rho = importance.policy_ratio(r.logp, r.old, r.mask, "sequence")
    else:
        rho = importance.sequence_weight(r.logp, r.old, r.mask)
    return rho if ratio.endswith("_grad") else rho.detach()


def per_sample_gradients(loss: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """g(y) = grad_params loss(y) for every sequence y, ``(N, P)``: one batched backward over the rows of
    the identity (``is_grads_batched``), or one backward per sample where that fails."""
    try:
        (G,) = torch.autograd.grad(
            loss, params, grad_outputs=torch.eye(loss.shape[0], dtype=loss.dtype), is_grads_batched=True,
            retain_graph=True,
        )
        return G.reshape(loss.shape[0], -1)
    except RuntimeError:  # an op without a batching rule: fall back to the loop
        pass
    rows = []
    for i in range(loss.shape[0]):
        (g,) = torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(params) if g is None else g)
    return torch.stack(rows).reshape(loss.shape[0], -1)


@dataclass(frozen=True)
class GradientStats:
    """Exact moments of a surrogate's single-sample gradient under y ~ q: ``mean`` = E g ``(P,)``,
    ``variance`` = E||g - E g||^2 (the trace of the covariance; NaN where the gradient also depends on the
    other members of the group, ``sequence_prenorm``)."""

    mean: torch.Tensor
    variance: float


def evaluate(setup: SamplerSetup, form: Form, group_size: int = DEFAULT_GROUP_SIZE, beta: float = 0.1) -> GradientStats:
    """Exact E_{y~q}[g(y)] and E||g - E g||^2 of ``form``'s loss gradient, sum over q's support.

    The reward term's advantage and the ``sequence_prenorm`` KL part come from groups of ``group_size``
    drawn from q, enumerated (``conditional_advantages``): the loss is linear in the advantage, so its
    expectation is the loss at the conditional mean advantage; the reward term's variance uses E[A^2 | y].
    ``sequence_prenorm`` is evaluated at ``beta`` (its KL part ``(E[A_beta | y] - E[A_0 | y]) / beta`` is
    not linear in beta when the group std rescales it)."""
    r = rollout(setup)
    with single_thread():
        if form.term == "reward":  # g(y, group) = A h(y) with h the gradient of the loss at A = 1
            mean_adv, second = conditional_advantages(r.reward, r.q, group_size, form.scale)
            H = per_sample_gradients(per_sample_loss(r, form, torch.ones_like(r.mask)), setup.policy.logits)
            mean = (r.q * mean_adv) @ H
            return GradientStats(mean, float((r.q * second * (H * H).sum(-1)).sum() - mean @ mean))
        shaped = None
        if form.scope == "sequence_prenorm":
            summed = kl.sequence_sum(_penalty(r, form), r.mask)
            a0, _ = conditional_advantages(r.reward, r.q, group_size, form.scale)
            a1, _ = conditional_advantages(r.reward - beta * summed, r.q, group_size, form.scale)
            shaped = ((a1 - a0) / beta).unsqueeze(-1).expand_as(r.mask)
        G = per_sample_gradients(per_sample_loss(r, form, shaped), setup.policy.logits)
    mean = r.q @ G
    if form.scope == "sequence_prenorm":
        return GradientStats(mean, math.nan)
    return GradientStats(mean, float((r.q * ((G - mean) ** 2).sum(-1)).sum()))


# ===================================================================================================
# On-policy: every estimator x placement x scope (docs/kl_gradient_bias.md, first table)
# ===================================================================================================


@dataclass(frozen=True)
class Variant:
    """One on-policy (placement, estimator, scope) combination whose expected gradient is checked.

    ``placement``: ``"reward"`` (detached per-token penalty times grad log pi, eq. 20/34/35/39) or
    ``"loss"`` (differentiated directly, eq. 14/61). ``estimator``: a ``kl.ESTIMATORS`` name, or one of
    the two documented extras: ``"k3_value"`` (reward: the k3 *value* as the penalty) and
    ``"k3_ratio_grad"`` (loss: k3 times the importance ratio *with* gradient, TRL's
    ``use_bias_correction_kl`` on-policy). ``scope``: a ``kl.REWARD_SCOPES`` name for the reward, ``"-"``
    for a loss (a loss is always summed over the tokens of the sample).
    """

    placement: str
    estimator: str
    scope: str = "-"

    @property
    def name(self) -> str:
        return f"{self.placement}/{self.estimator}" + (f"/{self.scope}" if self.placement == "reward" else "")

    @property
    def verdict(self) -> str:
        """The verdict of ``kl.SOUNDNESS`` (docs/theory.md#placement), or the documented one for the extras."""
        if self.estimator == "k3_value":
            return "unsound (extra row, like k2: eq. 34)"
        if self.estimator == "k3_ratio_grad":
            return "sound per token (extra row, kl_loss docstring)"
        return kl.SOUNDNESS[(self.estimator, self.placement)].verdict

    @property
    def form(self) -> Form:
        """The trainer's surrogate for this variant (on-policy every ratio is 1 in value)."""
        if self.placement == "reward":
            return Form("reward", self.estimator, self.scope, "token")
        if self.estimator == "k3_ratio_grad":
            return Form("loss", "k3", "-", "token_grad")
        return Form("loss", self.estimator, "-", "none")


REWARD_ESTIMATORS = ("k1", "k2", "k3", "k3_clip", "k3_value")
LOSS_ESTIMATORS = ("k1", "k2", "k3", "k3_clip", "full", "k3_ratio_grad")

VARIANTS: tuple[Variant, ...] = tuple(
    [Variant("reward", e, s) for e in REWARD_ESTIMATORS for s in kl.REWARD_SCOPES]
    + [Variant("loss", e) for e in LOSS_ESTIMATORS]
)
"""Every row of the on-policy table: reward placement x estimator x scope, then the loss forms."""


def variant(name: str) -> Variant:
    """Look a row of ``VARIANTS`` up by its ``Variant.name`` (e.g. ``"reward/k1/return_to_go"``, ``"loss/k2"``)."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"unknown variant {name!r}; known: {[v.name for v in VARIANTS]}")


def variant_gradients(policy: TabularPolicy, v: Variant) -> torch.Tensor:
    """On-policy per-sample gradients g(y) of a variant for every sequence, ``(N, P)``."""
    r = rollout(on_policy_setup(policy))
    return per_sample_gradients(per_sample_loss(r, v.form), policy.logits)


def expected_surrogate_gradient(policy: TabularPolicy, v: Variant) -> GradientStats:
    """Exact E_{y~pi}[g(y)] and E||g - E g||^2 of a variant on-policy. Equal to ``exact_kl_gradient`` means
    the placement/estimator/scope gives the gradient of the sequence KL (docs/theory.md#sequence-kl)."""
    return evaluate(on_policy_setup(policy), v.form)


@dataclass(frozen=True)
class BiasRow:
    """One row of the on-policy table (``gradient_bias_table``): the relative errors over seeds at
    (V, T) and at T = 1 (the bandit), the variance E||g - E g||^2 at (V, T), and ``grad_norm``,
    ||E g|| / ||grad KL|| (0 for k1 as a loss)."""

    variant: Variant
    rel_err: tuple[float, ...]
    rel_err_bandit: tuple[float, ...]
    variance: tuple[float, ...]
    grad_norm: tuple[float, ...]

    @property
    def measured(self) -> str:
        """What the exact numbers say, independent of ``kl.SOUNDNESS``."""
        if max(self.grad_norm) < 1e-9:
            return "zero gradient"
        if max(self.rel_err) < 1e-6:
            return "exact"
        if max(self.rel_err_bandit) < 1e-6:
            return "exact per token only"
        return "biased"


def gradient_bias_table(
    V: int = 3,
    T: int = 3,
    seeds: Iterable[int] = range(5),
    variants: Sequence[Variant] = VARIANTS,
    scale: float = 1.0,
) -> list[BiasRow]:
    """The on-policy table: for each variant and seed, the relative error of the exact expected surrogate
    gradient against the exact sequence-KL gradient at (V, T) and at T = 1 (bandit, same V and seed), and
    the gradient variance at (V, T)."""
    acc: dict[Variant, dict[str, list[float]]] = {v: {"e": [], "b": [], "var": [], "n": []} for v in variants}
    with single_thread():
        for seed in seeds:
            pol, bandit = make_tabular(V, T, seed, scale), make_tabular(V, 1, seed, scale)
            target, target_b = exact_kl_gradient(pol), exact_kl_gradient(bandit)
            for v in variants:
                st, stb = expected_surrogate_gradient(pol, v), expected_surrogate_gradient(bandit, v)
                acc[v]["e"].append(relative_error(st.mean, target))
                acc[v]["b"].append(relative_error(stb.mean, target_b))
                acc[v]["var"].append(st.variance)
                acc[v]["n"].append(float(st.mean.norm() / target.norm()))
    return [BiasRow(v, tuple(a["e"]), tuple(a["b"]), tuple(a["var"]), tuple(a["n"])) for v, a in acc.items()]


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isnan(x):
        return "–"
    if abs(x) < 1e-3 or abs(x) >= 1e4:
        return f"{x:.1e}"
    return f"{x:.3f}"


def format_gradient_table(rows: Sequence[BiasRow], V: int = 3, T: int = 3) -> str:
    """Markdown table of ``gradient_bias_table`` rows."""
    n = len(rows[0].rel_err)
    head = (
        f"| placement | estimator | scope | verdict (`kl.SOUNDNESS`) | measured | rel. error V={V},T={T} "
        f"mean [min, max] ({n} seeds) | rel. error T=1 (mean) | variance E‖g−Eg‖² (mean) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        v = r.variant
        lines.append(
            f"| {v.placement} | {v.estimator} | {v.scope} | {v.verdict} | {r.measured} | "
            f"{_fmt(statistics.fmean(r.rel_err))} [{_fmt(min(r.rel_err))}, {_fmt(max(r.rel_err))}] | "
            f"{_fmt(statistics.fmean(r.rel_err_bandit))} | {_fmt(statistics.fmean(r.variance))} |"
        )
    return head + "\n".join(lines) + "\n"


# ===================================================================================================
# Off-policy: the sampler is not the policy (docs/kl_gradient_bias.md, off-policy tables)
# ===================================================================================================

OFFPOLICY_SCENARIOS = ("on_policy", "stale", "engine", "engine_top_p", "stale_engine", "engine_far")

_SEQ = dict(correction="sequence_mask")  # TRL's sequence-level sampler correction, no cap: pi_old(y) / q(y)
_EXACT = dict(ratio="sequence_product", correction="sequence_mask", penalty_from="current")  # pi_theta(y) / q(y)

KL_FORMS: tuple[Form, ...] = (
    # reward placement, k1, return-to-go (the trainer's default): which importance weight?
    Form(),
    Form(correction="token_mask"),
    Form(**_SEQ),
    Form(ratio="sequence", **_SEQ),
    Form(ratio="sequence_product", **_SEQ),
    Form(**_EXACT),
    Form(ratio="per_decision", penalty_from="current"),
    Form(ratio="sequence_product", correction="sequence_mask", penalty_from="sampler"),
    Form(**_SEQ, ppo_clip=0.2),
    Form(**_EXACT, ppo_clip=0.2),
    # the other scopes
    Form(scope="sequence", **_SEQ),
    Form(scope="sequence", ratio="sequence", **_SEQ),
    Form(scope="sequence", **_EXACT),
    Form(scope="sequence_prenorm", scale="group", **_SEQ),
    Form(scope="sequence_prenorm", scale="none", **_SEQ),
    Form(scope="token", **_SEQ),
    Form(scope="token", ratio="sequence", **_SEQ),
    Form(scope="token", **_EXACT),
    Form(estimator="k3", **_EXACT),
    # loss placement
    Form("loss", "k2", "-", "token"),
    Form("loss", "k2", "-", "token", correction="token_mask"),
    Form("loss", "k2", "-", "sequence_product", **_SEQ),
    Form("loss", "full", "-", "none"),
    Form("loss", "full", "-", "sequence_product", **_SEQ),
    Form("loss", "k3", "-", "token_grad"),
    Form("loss", "k3", "-", "sequence_grad"),
    Form("loss", "k1", "-", "sequence_product_grad", **_SEQ),
    Form("loss", "k3", "-", "sequence_product_grad", **_SEQ),
)
"""Rows of the off-policy KL table (target: grad KL). The sampler corrections here have no cap, so the
table separates what each *level* of importance weight does; ``TRUNCATION_FORMS`` adds TRL's caps."""

TRUNCATION_FORMS: tuple[Form, ...] = tuple(
    Form(correction=c, cap=cap)
    for c, cap in (
        ("none", None),
        ("sequence_mask", None),
        ("sequence_mask", 3.0),
        ("sequence_truncate", 3.0),
        ("token_mask", 3.0),
        ("token_truncate", 3.0),
    )
) + (Form(ratio="sequence_product", correction="sequence_truncate", cap=3.0, penalty_from="current"),)
"""reward/k1/return_to_go with TRL's token-level policy ratio under each ``vllm_importance_sampling_mode`` at
TRL's default cap (``vllm_importance_sampling_clip_max=3``; ``sequence_mask`` is TRL's default mode)."""

REWARD_FORMS: tuple[Form, ...] = (
    Form(term="reward", scale="none"),
    Form(term="reward", scale="none", **_SEQ),
    Form(term="reward", scale="none", correction="sequence_mask", cap=3.0),
    Form(term="reward", scale="none", correction="token_mask"),
    Form(term="reward", scale="none", ratio="sequence", **_SEQ),
    Form(term="reward", scale="none", ratio="sequence_product", **_SEQ),
    Form(term="reward", scale="group", **_SEQ),
    Form(term="reward", scale="group", ratio="sequence_product", **_SEQ),
)
"""Rows of the reward-term table (target: (1 - 1/G) grad E[R], the centred group advantage's expectation)."""


@dataclass(frozen=True)
class OffPolicyRow:
    """One form over scenarios and seeds: ``rel_err[s][i]`` against the target (grad KL, or (1 - 1/G) grad
    E[R] for the reward term, in loss sign), ``gap[s][i]`` against the same form's on-policy expected update,
    ``scale[s][i]`` = <E g, target> / ||target||^2, ``direction[s][i]`` = ||E g - scale target|| / ||E g||,
    ``variance[s][i]`` = E||g - E g||^2; ``s`` indexes ``scenarios``."""

    form: Form
    scenarios: tuple[str, ...]
    rel_err: tuple[tuple[float, ...], ...]
    gap: tuple[tuple[float, ...], ...]
    scale: tuple[tuple[float, ...], ...]
    direction: tuple[tuple[float, ...], ...]
    variance: tuple[tuple[float, ...], ...]

    def at(self, field: str, scenario: str) -> tuple[float, ...]:
        """The per-seed values of ``field`` (``rel_err``, ``gap``, ...) in ``scenario``."""
        return getattr(self, field)[self.scenarios.index(scenario)]

    def verdict(self, scenario: str, tol: float = 1e-6) -> str:
        """``exact`` (E g = target on every seed), ``scaled`` (E g = c target, the same c on every seed),
        ``on-policy`` (E g = the form's own on-policy update, which is not the target) or ``biased``."""
        if max(self.at("rel_err", scenario)) < tol:
            return "exact"
        c = self.at("scale", scenario)
        if max(self.at("direction", scenario)) < tol and max(c) - min(c) < tol and min(c) > tol:
            return "scaled"
        if max(self.at("gap", scenario)) < tol:
            return "on-policy"
        return "biased"

    def cell(self, scenario: str) -> str:
        """The table cell: ``exact``, ``×c`` (scaled), ``≡ e`` (the form's on-policy error e) or the mean error."""
        verdict = self.verdict(scenario)
        if verdict == "exact":
            return "exact"
        if verdict == "scaled":
            return f"×{statistics.fmean(self.at('scale', scenario)):.3g}"
        mean = _fmt(statistics.fmean(self.at("rel_err", scenario)))
        return f"≡ {mean}" if verdict == "on-policy" else mean

    def mean_variance(self, scenario: str) -> float:
        return statistics.fmean(self.at("variance", scenario))


def offpolicy_table(
    forms: Sequence[Form],
    scenarios: Sequence[str] = OFFPOLICY_SCENARIOS,
    seeds: Iterable[int] = range(5),
    V: int = 3,
    T: int = 3,
    group_size: int = DEFAULT_GROUP_SIZE,
    beta: float = 0.1,
) -> list[OffPolicyRow]:
    """Evaluate each form in each scenario for each seed (``evaluate``), against grad KL (KL forms) or
    -(1 - 1/group_size) grad E[R] (the reward term: the loss decreases as the reward increases), and
    against the form's own on-policy update."""
    seeds, scenarios = list(seeds), tuple(scenarios)
    fields = ("rel_err", "gap", "scale", "direction", "variance")
    acc = {f: {k: [[] for _ in scenarios] for k in fields} for f in forms}
    with single_thread():
        for seed in seeds:
            on_policy = make_setup(V, T, seed, "on_policy")
            reference = {f: evaluate(on_policy, f, group_size, beta).mean for f in forms}
            for j, name in enumerate(scenarios):
                setup = make_setup(V, T, seed, name)
                kl_target = exact_kl_gradient(setup.policy)
                reward_target = -(1 - 1 / group_size) * exact_reward_gradient(setup)
                for f in forms:
                    st = evaluate(setup, f, group_size, beta)
                    target = reward_target if f.term == "reward" else kl_target
                    c = float(st.mean @ target / (target @ target))
                    values = (
                        relative_error(st.mean, target),
                        relative_error(st.mean, reference[f]),
                        c,
                        float((st.mean - c * target).norm() / st.mean.norm().clamp(min=1e-300)),
                        st.variance,
                    )
                    for k, value in zip(fields, values):
                        acc[f][k][j].append(value)
    return [
        OffPolicyRow(f, scenarios, *(tuple(tuple(x) for x in acc[f][k]) for k in fields)) for f in forms
    ]


@dataclass(frozen=True)
class ScenarioStats:
    """Exact statistics of one scenario instance: pi_theta's mass outside q's support (``missing``), the mean
    |log pi_old - log q| per token under q (TRL's ``sampling/sampling_logp_difference/mean``), the ESS
    fraction of the sequence weights pi_theta(y)/q(y) and of the per-decision weights (mean over t), the
    q-mass of the sequences whose TRL sequence correction exceeds 3 (zeroed by TRL's default
    ``sequence_mask``), and the q-weighted fraction of tokens outside the PPO clip [0.8, 1.2]."""

    missing: float
    logp_difference: float
    ess_sequence: float
    ess_per_decision: float
    masked_at_3: float
    ppo_clipped: float


def ess_fraction(weights: torch.Tensor, probs: torch.Tensor) -> float:
    """(E_q w)^2 / E_q w^2 of importance weights ``weights`` ``(N,)`` under the sampler's probabilities
    ``probs`` ``(N,)``, exactly: the fraction of the samples that count (1 on-policy). For an empirical
    batch, ``advantages.effective_sample_size`` is the same quantity."""
    second = float((probs * weights * weights).sum())
    return float((probs * weights).sum()) ** 2 / second if second > 0 else 0.0


def scenario_stats(setup: SamplerSetup) -> ScenarioStats:
    """``ScenarioStats`` of one instance (``importance``'s weights, exact expectations under q)."""
    r = rollout(setup)
    with torch.no_grad():
        tokens = float(r.mask.sum(-1).mean())
        w = importance.sequence_weight(r.logp.detach(), r.sampling, r.mask).squeeze(-1)
        prefix = importance.prefix_weights(r.logp.detach(), r.sampling, r.mask)
        corr = importance.sampler_correction(r.old, r.sampling, r.mask, "sequence_mask", None, None).squeeze(-1)
        coef = importance.policy_ratio(r.logp.detach(), r.old, r.mask)
        return ScenarioStats(
            missing=r.missing,
            logp_difference=float(r.q @ (r.old - r.sampling).abs().sum(-1)) / tokens,
            ess_sequence=ess_fraction(w, r.q),
            ess_per_decision=statistics.fmean(ess_fraction(prefix[:, t], r.q) for t in range(r.mask.shape[1])),
            masked_at_3=float(r.q[corr > 3.0].sum()),
            ppo_clipped=float(r.q @ ((coef - 1).abs() > 0.2).double().sum(-1)) / tokens,
        )


def all_scenario_stats(
    scenarios: Sequence[str] = OFFPOLICY_SCENARIOS, seeds: Iterable[int] = range(5), V: int = 3, T: int = 3
) -> dict[str, list[ScenarioStats]]:
    """``scenario_stats`` of every instance: ``{scenario: [stats of each seed]}``."""
    seeds = list(seeds)
    return {name: [scenario_stats(make_setup(V, T, s, name)) for s in seeds] for name in scenarios}


def format_scenarios(stats: dict[str, list[ScenarioStats]]) -> str:
    """Markdown table of the scenarios: description and ``ScenarioStats`` means over seeds
    (``all_scenario_stats``)."""
    head = (
        "| scenario | what differs | π_θ mass outside q | mean \\|log π_old − log q\\| | ESS π_θ(y)/q(y) | "
        "ESS per-decision | q-mass masked by TRL's default (seq. ratio > 3) | tokens outside PPO clip 0.2 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, st in stats.items():
        m = {k: statistics.fmean(getattr(x, k) for x in st) for k in ScenarioStats.__dataclass_fields__}
        lines.append(
            f"| {name} | {SCENARIOS[name].description} | {m['missing']:.3f} | {m['logp_difference']:.3f} | "
            f"{m['ess_sequence']:.3f} | {m['ess_per_decision']:.3f} | {m['masked_at_3']:.3f} | {m['ppo_clipped']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def _form_columns(f: Form) -> list[str]:
    if f.term == "reward":
        what = f"reward term, scale_rewards={f.scale}"
    else:
        what = f"{f.placement}/{f.estimator}" + (f"/{f.scope}" if f.placement == "reward" else "")
        if f.scope == "sequence_prenorm":
            what += f", scale_rewards={f.scale}"
        if f.ppo_clip is not None:
            what += f", PPO clip {f.ppo_clip:g}"
    penalty = f.penalty_from if (f.placement == "reward" and f.term == "kl") else "–"
    return [what, f.ratio, f.correction_label, penalty]


def _scenario_table(
    columns: Sequence[str],
    leads: Sequence[Sequence[str]],
    rows: Sequence[OffPolicyRow],
    variance_scenarios: Sequence[str],
) -> str:
    """Markdown table: the leading ``columns`` (each row's cells in ``leads``), one cell per scenario
    (``OffPolicyRow.cell``), then the variance E‖g − E g‖² on-policy and in each of ``variance_scenarios``
    (mean over seeds)."""
    scenarios = rows[0].scenarios
    variance = "variance on-policy → " + " → ".join(variance_scenarios)
    head = f"| {' | '.join([*columns, *scenarios, variance])} |\n|" + "---|" * (len(columns) + len(scenarios) + 1)
    lines = [
        f"| {' | '.join([*lead, *(r.cell(s) for s in scenarios)])} | "
        + " → ".join(_fmt(r.mean_variance(s)) for s in ("on_policy", *variance_scenarios))
        + " |"
        for lead, r in zip(leads, rows, strict=True)
    ]
    return head + "\n" + "\n".join(lines) + "\n"


def format_offpolicy_table(rows: Sequence[OffPolicyRow], variance_scenario: str = "stale_engine") -> str:
    """Markdown table of ``offpolicy_table`` rows: the form's columns, one cell per scenario, the variance
    on-policy and in ``variance_scenario``."""
    columns = ("form", "policy ratio", "sampler correction", "penalty from")
    return _scenario_table(columns, [_form_columns(r.form) for r in rows], rows, (variance_scenario,))


TRAINER_VARIANCE_SCENARIOS = ("stale_engine", "engine_far")


def format_trainer_table(configs: Sequence[TrainerConfig], rows: Sequence[OffPolicyRow]) -> str:
    """Markdown table of the trainer's configurations (``TRAINER_CONFIGS``) and their ``offpolicy_table`` rows
    (of ``trainer_form(config)``, in the same order): one cell per scenario, then the variance on-policy and in
    ``TRAINER_VARIANCE_SCENARIOS``."""
    leads = [(config.label, f"`{r.form.name}`") for config, r in zip(configs, rows, strict=True)]
    return _scenario_table(("GRPOConfig (beta > 0)", "harness form"), leads, rows, TRAINER_VARIANCE_SCENARIOS)

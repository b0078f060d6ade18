"""Preference losses as pure functions of per-sequence log-probabilities, plus a registry.

Every loss here sees only per-sequence numbers: the summed log-probability of each completion
under the policy (and, for most losses, under the frozen reference model) and the completion
lengths. It never sees logits, the vocabulary, the model or the data, so each one is a few
element-wise tensor operations over a ``[B]`` batch of pairs and is easy to test by hand.

Notation used in the docstrings (all per pair, ``B`` pairs in the batch):

* ``pc``, ``pr``: policy log-probs of the chosen / rejected completion, summed over tokens.
* ``rc``, ``rr``: the same under the reference model.
* ``lc``, ``lr``: completion token counts; ``mc = pc / lc``, ``mr = pr / lr`` are mean log-probs.
* ``logits = (pc - pr) - (rc - rr)``; ``chosen_logratios = pc - rc``;
  ``rejected_logratios = pr - rr``.
* ``beta``, ``eps`` (label smoothing) and the other knobs come from :class:`LossParams`.

Numerics: every input is cast to float32 first, and only ``logsigmoid`` / ``softplus`` /
``sigmoid`` and log-space rewrites are used (never ``log(sigmoid(x))`` or a bare ``exp`` of an
unbounded argument), so bf16 inputs with margins of +-1e4 still give finite losses and
gradients.

The loss definitions follow TRL's ``DPOTrainer`` (``CPOTrainer`` for SimPO, ``ORPOTrainer`` for
ORPO) where TRL has them; the docstring of each function says where and why this module differs.
"""

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "Objective",
    "PreferenceBatch",
    "apply_ld_alpha",
    "compute_loss",
    "needs_reference",
]


@dataclass
class LossParams:
    """Hyper-parameters of all losses; each loss reads only the fields it needs."""

    beta: float = 0.1  # DPO temperature (also SimPO beta; ORPO's lambda is orpo_lambda)
    label_smoothing: float = 0.0  # cDPO / robust DPO epsilon in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO target margin gamma (absolute, as TRL's simpo_gamma)
    orpo_lambda: float = 0.1  # ORPO weight of the odds-ratio term
    dpop_lambda: float = 50.0  # DPO-Positive (Smaug) penalty weight
    ld_alpha: float | None = None  # LD-DPO alpha in [0, 1]; None = off
    discopop_tau: float = 0.05  # DiscoPOP temperature
    # BCO running mean of the implicit rewards (reward units, i.e. already times beta).
    # Objective owns it: after each step `Objective.observe` folds the step's mean of the
    # "bco_rewards_mean" metric into a running mean over all pairs (TRL's RunningMoments).
    bco_delta: float = 0.0


@dataclass
class PreferenceBatch:
    """Per-sequence log-probs of a batch of ``B`` preference pairs (all tensors ``[B]``).

    The ``*_public_logps`` fields are only needed for LD-DPO (``LossParams.ld_alpha``): each is
    the log-prob summed over the first ``min(chosen_length, rejected_length)`` completion tokens
    of that sequence (the "public" part both completions have; the rest is the "verbose" part).
    """

    policy_chosen_logps: torch.Tensor  # summed log-probs over completion tokens
    policy_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # completion token counts (>= 1)
    rejected_lengths: torch.Tensor
    reference_chosen_logps: torch.Tensor | None = None
    reference_rejected_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # optional per-pair weight, multiplies the per-pair loss
    policy_chosen_public_logps: torch.Tensor | None = None
    policy_rejected_public_logps: torch.Tensor | None = None
    reference_chosen_public_logps: torch.Tensor | None = None
    reference_rejected_public_logps: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.reference_chosen_logps is not None and self.reference_rejected_logps is not None


@dataclass
class LossOutput:
    """What a loss returns; every tensor is ``[B]`` float32."""

    losses: torch.Tensor  # per-pair loss, already multiplied by the batch weights if given
    chosen_rewards: torch.Tensor  # detached; logged under rewards/chosen
    rejected_rewards: torch.Tensor  # detached; logged under rewards/rejected
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra detached [B] metrics


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[PreferenceBatch, LossParams], LossOutput]
    needs_reference: bool
    paper: str  # short citation
    recommended: str  # recommended hyper-parameters, one line, for the README table


# --------------------------------------------------------------------------------------------
# helpers


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _policy(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return _f32(batch.policy_chosen_logps), _f32(batch.policy_rejected_logps)


def _lengths(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    # clamp(min=1) so an (invalid) empty completion cannot divide by zero
    return _f32(batch.chosen_lengths).clamp(min=1.0), _f32(batch.rejected_lengths).clamp(min=1.0)


def _missing_reference_error(name: str) -> ValueError:
    free = ", ".join(n for n, s in LOSSES.items() if not s.needs_reference)
    return ValueError(
        f"Loss {name!r} needs reference log-probs, but the batch has no reference_chosen_logps / "
        f"reference_rejected_logps. Compute them with the reference model (or precompute them), "
        f"or use a reference-free loss ({free})."
    )


def _reference(batch: PreferenceBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not batch.has_reference:
        raise _missing_reference_error(name)
    assert batch.reference_chosen_logps is not None and batch.reference_rejected_logps is not None
    return _f32(batch.reference_chosen_logps), _f32(batch.reference_rejected_logps)


def _ref_terms(
    batch: PreferenceBatch, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(logits, chosen_logratios, rejected_logratios)`` in float32."""
    pc, pr = _policy(batch)
    rc, rr = _reference(batch, name)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    return chosen_logratios - rejected_logratios, chosen_logratios, rejected_logratios


def _smoothed_logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: ``-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)`` (plain DPO when eps = 0)."""
    loss = -F.logsigmoid(x) * (1.0 - eps)
    if eps:
        loss = loss - F.logsigmoid(-x) * eps
    return loss


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate everywhere (Maechler 2012).

    ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` far from 0; the switch at ``-log 2`` keeps
    both branches away from catastrophic cancellation.
    """
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


def _finish(
    batch: PreferenceBatch,
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    metrics: dict[str, torch.Tensor] | None = None,
) -> LossOutput:
    if batch.weights is not None:
        losses = losses * _f32(batch.weights)
    return LossOutput(
        losses=losses.float(),
        chosen_rewards=chosen_rewards.detach().float(),
        rejected_rewards=rejected_rewards.detach().float(),
        metrics={k: v.detach().float() for k, v in (metrics or {}).items()},
    )


def _ref_rewards(
    beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * chosen_logratios, beta * rejected_logratios


# --------------------------------------------------------------------------------------------
# reference-based losses


def sigmoid_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """DPO with optional conservative label smoothing (cDPO).

    ``loss = -(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)``

    Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290. Label smoothing: Mitchell 2023,
    "A note on DPO with noisy preferences & relationship to IPO" (cDPO): it assumes each label is
    flipped with probability eps, which bounds the loss's optimum instead of driving the margin to
    infinity.
    """
    logits, cl, rl = _ref_terms(batch, "sigmoid")
    losses = _smoothed_logistic(params.beta * logits, params.label_smoothing)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def robust_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """Robust DPO (rDPO), an unbiased estimate of the clean DPO loss under label noise eps.

    ``loss = (-(1 - eps) * logsigmoid(beta * logits) + eps * logsigmoid(-beta * logits))
    / (1 - 2 * eps)``

    Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv:2403.00409. Unlike cDPO the flipped term is *added* back (de-biasing), so the
    per-pair loss can be negative; eps must be below 0.5.
    """
    eps = params.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {eps}")
    logits, cl, rl = _ref_terms(batch, "robust")
    x = params.beta * logits
    losses = (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def hinge_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """SLiC-HF / RSO hinge loss: ``loss = relu(1 - beta * logits)``.

    Zhao, Joshi, Liu, Khalman, Saleh, Liu 2023, "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback", arXiv:2305.10425; Liu, Zhao, Joshi, Khalman, Saleh, Liu, Liu 2023,
    "Statistical Rejection Sampling Improves Preference Optimization" (RSO), arXiv:2309.06657.
    As in TRL/RSO the log-ratio is taken against the reference, and 1/beta is the margin.
    """
    logits, cl, rl = _ref_terms(batch, "hinge")
    losses = torch.relu(1.0 - params.beta * logits)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def ipo_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """IPO: squared distance of the length-normalised margin to ``1 / (2 * beta)``.

    ``h = (pc/lc - pr/lr) - (rc/lc - rr/lr)``; ``loss = (h - 1 / (2 * beta)) ** 2``

    Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", arXiv:2310.12036 (Eq. 17, beta is the paper's
    tau). Why the per-token mean: with summed log-probs the squared loss grows with completion
    length; TRL normalises by the token count (confirmed with the IPO authors), so we do too.
    Rewards are still logged un-normalised, ``beta * (policy - reference)``.
    """
    _, cl, rl = _ref_terms(batch, "ipo")
    lc, lr = _lengths(batch)
    h = cl / lc - rl / lr
    losses = (h - 1.0 / (2.0 * params.beta)) ** 2
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def exo_pair_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """EXO (pairwise): reverse KL from the model's pair distribution to the label distribution.

    With ``q = sigmoid(beta * logits)`` and the label distribution ``(1 - eps, eps)``:
    ``loss = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps)``

    Ji, Lu, Ren, Gao, Zhang, Hu, Xu, Pan, Zhou, Yang 2024, "Towards Efficient Exact Optimization
    of Language Model Alignment", arXiv:2402.00856 (Eq. 16). eps = 0 would make ``log eps``
    infinite, so as TRL 0.x does, label_smoothing 0 is taken as eps = 1e-3.
    """
    logits, cl, rl = _ref_terms(batch, "exo_pair")
    eps = params.label_smoothing or 1e-3
    x = params.beta * logits
    losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def nca_pair_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """NCA (pairwise): absolute, not only relative, likelihood of each response.

    With ``r_c = beta * (pc - rc)``, ``r_r = beta * (pr - rr)``:
    ``loss = -logsigmoid(r_c) - 0.5 * logsigmoid(-r_c) - 0.5 * logsigmoid(-r_r)``

    Chen, He, Zhang, Zheng, Wang, Liu, Chen 2024, "Noise Contrastive Alignment of Language Models
    with Explicit Rewards", arXiv:2402.05369. Why: DPO only moves the margin, so both likelihoods
    can fall; NCA's per-response terms keep the chosen likelihood from decreasing.
    """
    _, cl, rl = _ref_terms(batch, "nca_pair")
    rc_, rr_ = _ref_rewards(params.beta, cl, rl)
    losses = -F.logsigmoid(rc_) - 0.5 * F.logsigmoid(-rc_) - 0.5 * F.logsigmoid(-rr_)
    return _finish(batch, losses, rc_, rr_)


def bco_pair_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """BCO (pairwise): a binary classifier with the implicit reward as logit, shifted by delta.

    With ``r_c = beta * (pc - rc)``, ``r_r = beta * (pr - rr)`` and delta the running mean of the
    rewards (``LossParams.bco_delta``):
    ``loss = -logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))``

    Jung, Kim, Kim, Kim 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656. TRL keeps delta as a running mean of ``mean(cat(r_c, r_r))``
    over all steps; here the loss stays pure and :class:`Objective` updates ``bco_delta`` from
    the per-pair metric ``bco_rewards_mean = (r_c + r_r) / 2`` (its batch mean equals TRL's).
    """
    _, cl, rl = _ref_terms(batch, "bco_pair")
    rc_, rr_ = _ref_rewards(params.beta, cl, rl)
    delta = params.bco_delta
    losses = -F.logsigmoid(rc_ - delta) - F.logsigmoid(-(rr_ - delta))
    return _finish(batch, losses, rc_, rr_, {"bco_rewards_mean": (rc_ + rr_) / 2.0})


def sppo_hard_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """SPPO with hard labels: regress each log-ratio to ``+-1 / (2 * beta)``.

    ``loss = (pc - rc - 1 / (2 * beta)) ** 2 + (pr - rr + 1 / (2 * beta)) ** 2``

    Wu, Sun, Yuan, Ji, Yang, Gu 2024, "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675 (Eq. 4.7 with the win probability set to 1 for the chosen and 0
    for the rejected response; the paper's eta is 1 / beta). The paper estimates soft
    probabilities with PairRM outside the trainer; this is TRL's hard version.
    """
    _, cl, rl = _ref_terms(batch, "sppo_hard")
    half = 0.5 / params.beta
    losses = (cl - half) ** 2 + (rl + half) ** 2
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def apo_zero_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """APO-zero: push the chosen reward up and the rejected reward down, each towards zero-anchor.

    ``loss = (1 - sigmoid(beta * (pc - rc))) + sigmoid(beta * (pr - rr))``

    D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri 2024, "Anchored Preference
    Optimization and Contrastive Revisions: Addressing Underspecification in Alignment",
    arXiv:2408.06266 (Eq. 7). Use when the chosen outputs are better than the model's own.
    """
    _, cl, rl = _ref_terms(batch, "apo_zero")
    losses = torch.sigmoid(-params.beta * cl) + torch.sigmoid(params.beta * rl)  # 1-s(x)=s(-x)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def apo_down_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """APO-down: lower the chosen likelihood, and the rejected one more.

    ``loss = sigmoid(beta * (pc - rc)) + (1 - sigmoid(beta * logits))``

    D'Oosterlinck et al. 2024, arXiv:2408.06266 (Eq. 8). Use when the chosen outputs are worse
    than the model's own outputs (e.g. the model already beats the data).
    """
    logits, cl, rl = _ref_terms(batch, "apo_down")
    losses = torch.sigmoid(params.beta * cl) + torch.sigmoid(-params.beta * logits)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def aot_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """AOT (paired): DPO on the sorted policy and sorted reference log-ratio margins.

    ``d = sort(pc - pr) - sort(rc - rr)`` (sorted across the batch);
    ``loss = -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)``

    Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross 2024,
    "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882. Why
    sort: matching quantiles is the 1-D optimal transport that makes the policy margin
    distribution stochastically dominate the reference's. Consequences: entry i of the returned
    ``losses`` belongs to rank i, not to pair i (per-pair ``weights`` are applied by position, so
    only uniform weights are meaningful), and the loss needs several pairs per micro-batch.
    """
    pc, pr = _policy(batch)
    rc, rr = _reference(batch, "aot")
    cl, rl = pc - rc, pr - rr
    d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    losses = _smoothed_logistic(params.beta * d, params.label_smoothing)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def aot_unpaired_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """AOT (unpaired): DPO on sorted chosen vs sorted rejected log-ratios.

    ``d = sort(pc - rc) - sort(pr - rr)`` (sorted across the batch);
    ``loss = -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)``

    Melnyk et al. 2024, arXiv:2406.05882. The unpaired variant makes the chosen reward
    distribution dominate the rejected one without using the pairing; the same rank-not-pair
    caveat as ``aot`` applies.
    """
    _, cl, rl = _ref_terms(batch, "aot_unpaired")
    d = torch.sort(cl, dim=0).values - torch.sort(rl, dim=0).values
    losses = _smoothed_logistic(params.beta * d, params.label_smoothing)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def discopop_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): a sigmoid-gated blend of DPO and an exponential loss.

    With ``x = beta * logits`` and ``m = sigmoid(x / tau)``:
    ``loss = (1 - m) * (-logsigmoid(x)) + m * exp(-x)``

    Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange 2024, "Discovering Preference
    Optimization Algorithms with and without Human Intervention", arXiv:2406.08414 (Eq. 5).
    Numerics: ``m * exp(-x)`` is evaluated as ``exp(logsigmoid(x / tau) - x)``, which is finite
    for very negative x whenever tau < 1 (then m decays faster than exp(-x) grows); the exponent
    is capped at 50 so that a tau >= 1 cannot overflow either.
    """
    logits, cl, rl = _ref_terms(batch, "discopop")
    tau = params.discopop_tau
    if tau <= 0:
        raise ValueError(f"discopop needs discopop_tau > 0, got {tau}")
    x = params.beta * logits
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / tau)  # (1 - m) = sigmoid(-x / tau)
    exponential = torch.exp(torch.clamp(F.logsigmoid(x / tau) - x, max=50.0))
    return _finish(batch, logistic + exponential, *_ref_rewards(params.beta, cl, rl))


def sigmoid_norm_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """Length-normalised DPO: DPO (with cDPO smoothing) on mean per-token log-probs.

    ``h = (pc/lc - pr/lr) - (rc/lc - rr/lr)``;
    ``loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``

    DPO (Rafailov et al. 2023, arXiv:2305.18290) on length-normalised log-probs, as used by
    Tulu 3 (Lambert et al. 2024, arXiv:2411.15124). Why: the summed margin favours long
    completions; per-token margins are ~lc times smaller, so beta is much larger (Tulu 3: 5).
    Rewards are logged un-normalised, ``beta * (policy - reference)``.
    """
    _, cl, rl = _ref_terms(batch, "sigmoid_norm")
    lc, lr = _lengths(batch)
    h = cl / lc - rl / lr
    losses = _smoothed_logistic(params.beta * h, params.label_smoothing)
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl))


def dpop_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """DPO-Positive (DPOP, "Smaug"): DPO plus a penalty when the chosen likelihood drops.

    ``loss = -logsigmoid(beta * (logits - lambda * relu(rc - pc)))``

    Pal, Karkhanis, Dooley, Roberts, Naidu, White 2024, "Smaug: Fixing Failure Modes of
    Preference Optimisation with DPO-Positive", arXiv:2402.13228. Why: on pairs with small edit
    distance DPO can lower both likelihoods while still growing the margin; the penalty is
    active only while the chosen log-prob is below the reference's. Metric ``dpop_penalty`` is
    ``relu(rc - pc)``.
    """
    logits, cl, rl = _ref_terms(batch, "dpop")
    penalty = torch.relu(-cl)  # relu(rc - pc)
    losses = -F.logsigmoid(params.beta * (logits - params.dpop_lambda * penalty))
    return _finish(batch, losses, *_ref_rewards(params.beta, cl, rl), {"dpop_penalty": penalty})


# --------------------------------------------------------------------------------------------
# reference-free losses


def sft_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """Negative log-likelihood of the chosen completion, per token: ``loss = -pc / lc``.

    Used alone (SFT) or, more usually, as an auxiliary term, e.g. RPO: Pang, Yuan, Cho, He,
    Sukhbaatar, Weston 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733
    (``["sigmoid", "sft"]``). Differs from TRL's ``sft`` in averaging per sequence rather than
    over all tokens of the batch, so that it is a per-pair loss like every other one here.
    There is no implicit reward; the logged rewards are ``beta * pc / lc`` and ``beta * pr / lr``
    (the SimPO reward), and metric ``nll_loss`` is ``-pc / lc``.
    """
    pc, pr = _policy(batch)
    lc, lr = _lengths(batch)
    mc, mr = pc / lc, pr / lr
    return _finish(batch, -mc, params.beta * mc, params.beta * mr, {"nll_loss": -mc})


def simpo_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """SimPO: reference-free margin of mean log-probs with a target margin gamma.

    ``x = beta * (pc/lc - pr/lr) - gamma``;
    ``loss = -(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)``

    Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734 (Eq. 6). ``simpo_gamma`` is the absolute margin gamma (TRL's CPOTrainer
    computes ``beta * (margin - simpo_gamma / beta)``, the same thing); label smoothing as in
    TRL. Rewards: ``beta * pc / lc`` and ``beta * pr / lr``, the paper's implicit reward.
    """
    pc, pr = _policy(batch)
    lc, lr = _lengths(batch)
    mc, mr = pc / lc, pr / lr
    x = params.beta * (mc - mr) - params.simpo_gamma
    losses = _smoothed_logistic(x, params.label_smoothing)
    return _finish(batch, losses, params.beta * mc, params.beta * mr)


# Mean log-probs are clamped just below 0 before log(1 - exp(m)): m = 0 (probability one, or a
# numerically positive sum) would make the odds infinite.
_ORPO_MAX_MEAN_LOGP = -1e-6


def orpo_loss(batch: PreferenceBatch, params: LossParams) -> LossOutput:
    """ORPO: NLL of the chosen completion plus a weighted odds-ratio preference term.

    With mean log-probs ``mc = pc/lc``, ``mr = pr/lr`` and ``odds(p) = p / (1 - p)``:
    ``log_odds = (mc - mr) - (log(1 - exp(mc)) - log(1 - exp(mr)))``;
    ``loss = -mc - lambda * logsigmoid(log_odds)``

    Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691 (Eqs. 6-7). The NLL term is part of this loss (so do not also add ``sft``
    unless a stronger SFT term is wanted). ``log(1 - exp(m))`` uses a stable log1mexp and ``m`` is
    clamped to at most -1e-6 so probability-one inputs stay finite. As TRL's ORPOTrainer does,
    rewards are ``beta * mc`` and ``beta * mr``; metrics: ``log_odds_ratio`` is
    ``logsigmoid(log_odds)`` (TRL's name for it), ``log_odds_chosen`` is ``log_odds`` and
    ``nll_loss`` is ``-mc``.
    """
    pc, pr = _policy(batch)
    lc, lr = _lengths(batch)
    mc = (pc / lc).clamp(max=_ORPO_MAX_MEAN_LOGP)
    mr = (pr / lr).clamp(max=_ORPO_MAX_MEAN_LOGP)
    log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
    ratio = F.logsigmoid(log_odds)
    nll = -(pc / lc)
    losses = nll - params.orpo_lambda * ratio
    metrics = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": nll}
    return _finish(batch, losses, params.beta * pc / lc, params.beta * pr / lr, metrics)


# --------------------------------------------------------------------------------------------
# registry


def _spec(
    name: str, fn: Callable[[PreferenceBatch, LossParams], LossOutput], ref: bool, paper: str,
    recommended: str,
) -> tuple[str, LossSpec]:
    return name, LossSpec(name, fn, ref, paper, recommended)


LOSSES: dict[str, LossSpec] = dict(
    [
        _spec("sigmoid", sigmoid_loss, True,
              "DPO: Rafailov et al. 2023, arXiv:2305.18290; cDPO: Mitchell 2023",
              "beta 0.1 (0.01-0.5); label_smoothing 0 (0.1 for noisy labels, cDPO)"),
        _spec("robust", robust_loss, True,
              "rDPO: Chowdhury et al. 2024, arXiv:2403.00409",
              "beta 0.1; label_smoothing = expected label flip rate, 0.1-0.2"),
        _spec("hinge", hinge_loss, True,
              "SLiC-HF: Zhao et al. 2023, arXiv:2305.10425; RSO: Liu et al. 2023, "
              "arXiv:2309.06657",
              "beta 0.1-1 (1/beta is the hinge margin)"),
        _spec("ipo", ipo_loss, True,
              "IPO: Azar et al. 2023, arXiv:2310.12036",
              "beta (tau) 0.1-1; the target per-token margin is 1/(2*beta)"),
        _spec("exo_pair", exo_pair_loss, True,
              "EXO: Ji et al. 2024, arXiv:2402.00856",
              "beta 0.1; label_smoothing 1e-3 (0 means 1e-3)"),
        _spec("nca_pair", nca_pair_loss, True,
              "NCA: Chen et al. 2024, arXiv:2402.05369",
              "beta 0.01-0.1"),
        _spec("bco_pair", bco_pair_loss, True,
              "BCO: Jung et al. 2024, arXiv:2404.04656",
              "beta 0.1; delta is the running mean reward of all pairs so far"),
        _spec("sppo_hard", sppo_hard_loss, True,
              "SPPO: Wu et al. 2024, arXiv:2405.00675",
              "beta 1e-3 (the paper's eta = 1/beta = 1e3)"),
        _spec("apo_zero", apo_zero_loss, True,
              "APO: D'Oosterlinck et al. 2024, arXiv:2408.06266",
              "beta 0.1; when chosen outputs beat the model's own"),
        _spec("apo_down", apo_down_loss, True,
              "APO: D'Oosterlinck et al. 2024, arXiv:2408.06266",
              "beta 0.1; when the model's own outputs beat the chosen ones"),
        _spec("aot", aot_loss, True,
              "AOT: Melnyk et al. 2024, arXiv:2406.05882",
              "beta 0.01-0.1; many pairs per micro-batch (it sorts across the batch)"),
        _spec("aot_unpaired", aot_unpaired_loss, True,
              "AOT: Melnyk et al. 2024, arXiv:2406.05882",
              "beta 0.01-0.1; many pairs per micro-batch (it sorts across the batch)"),
        _spec("discopop", discopop_loss, True,
              "DiscoPOP: Lu et al. 2024, arXiv:2406.08414",
              "beta 0.05-0.1; discopop_tau 0.05"),
        _spec("sigmoid_norm", sigmoid_norm_loss, True,
              "Length-normalised DPO: Rafailov et al. 2023, arXiv:2305.18290; Tulu 3, "
              "Lambert et al. 2024, arXiv:2411.15124",
              "beta 2-10 (Tulu 3: 5), per-token margins are small"),
        _spec("dpop", dpop_loss, True,
              "DPO-Positive (Smaug): Pal et al. 2024, arXiv:2402.13228",
              "beta 0.3; dpop_lambda 50"),
        _spec("sft", sft_loss, False,
              "NLL on chosen; as an auxiliary term: RPO, Pang et al. 2024, arXiv:2404.19733",
              "as an auxiliary term, weight 0.1-1 (RPO: ['sigmoid', 'sft'] with [1, 1])"),
        _spec("simpo", simpo_loss, False,
              "SimPO: Meng et al. 2024, arXiv:2405.14734",
              "beta 2-10 (2.5); simpo_gamma 0.5-1.5 (gamma/beta about 0.3-0.5)"),
        _spec("orpo", orpo_loss, False,
              "ORPO: Hong et al. 2024, arXiv:2403.07691",
              "orpo_lambda 0.1-0.25; higher learning rate than DPO (SFT-like, e.g. 5e-6..8e-6)"),
    ]
)


# --------------------------------------------------------------------------------------------
# public entry points


def _names(types: str | Sequence[str]) -> list[str]:
    names = [types] if isinstance(types, str) else list(types)
    if not names:
        raise ValueError(f"No loss given; allowed: {', '.join(LOSSES)}")
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"Unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return names


def needs_reference(types: str | Sequence[str]) -> bool:
    """Whether any of the named losses needs reference-model log-probs."""
    return any(LOSSES[n].needs_reference for n in _names(types))


def apply_ld_alpha(batch: PreferenceBatch, ld_alpha: float | None) -> PreferenceBatch:
    """LD-DPO: down-weight the verbose (beyond the shorter completion) part of every log-prob.

    Each summed log-prob ``full`` with public part ``public`` (the first ``min(lc, lr)`` tokens)
    becomes ``public + alpha * (full - public)``, for the policy and the reference alike.

    Liu, Xu, Fan, Jiang, Li, Liu, Shi, Xu 2024, "Length Desensitization in Direct Preference
    Optimization", arXiv:2409.06411. Why: the summed log-prob of the longer completion carries
    extra tokens that inflate the DPO margin and teach verbosity; alpha = 1 is plain DPO,
    alpha = 0 compares only the equal-length prefixes. Lengths are left unchanged.
    Returns ``batch`` itself when ``ld_alpha`` is None.
    """
    if ld_alpha is None:
        return batch
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1] or None, got {ld_alpha}")
    needed = ["policy_chosen_public_logps", "policy_rejected_public_logps"]
    if batch.has_reference:
        needed += ["reference_chosen_public_logps", "reference_rejected_public_logps"]
    missing = [n for n in needed if getattr(batch, n) is None]
    if missing:
        raise ValueError(
            f"ld_alpha={ld_alpha} (LD-DPO) needs the log-probs of the shared-length part of each "
            f"completion, but the batch lacks {', '.join(missing)}; compute them (sum over the "
            f"first min(chosen_length, rejected_length) completion tokens) or set ld_alpha to None."
        )

    alpha: float = ld_alpha

    def mix(full: torch.Tensor | None, public: torch.Tensor | None) -> torch.Tensor | None:
        if full is None or public is None:
            return full
        public = _f32(public)
        return public + alpha * (_f32(full) - public)

    return replace(
        batch,
        policy_chosen_logps=mix(batch.policy_chosen_logps, batch.policy_chosen_public_logps),
        policy_rejected_logps=mix(batch.policy_rejected_logps, batch.policy_rejected_public_logps),
        reference_chosen_logps=mix(
            batch.reference_chosen_logps, batch.reference_chosen_public_logps
        ),
        reference_rejected_logps=mix(
            batch.reference_rejected_logps, batch.reference_rejected_public_logps
        ),
    )


def _check_params(params: LossParams) -> None:
    if not params.beta > 0:
        raise ValueError(f"beta must be > 0, got {params.beta}")
    if not 0.0 <= params.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {params.label_smoothing}")
    if params.ld_alpha is not None and not 0.0 <= params.ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1] or None, got {params.ld_alpha}")


def compute_loss(
    types: str | Sequence[str],
    batch: PreferenceBatch,
    params: LossParams,
    weights: Sequence[float] | None = None,
) -> LossOutput:
    """Compute one loss, or a weighted sum of several: ``losses = sum_i w_i * losses_i``.

    * ``weights`` default to 1.0 each; there must be one per loss.
    * LD-DPO (``params.ld_alpha``) is applied, through :func:`apply_ld_alpha`, to the batch the
      reference-based losses see; reference-free losses (simpo, orpo, sft) get the batch as given,
      as LD-DPO is defined for the DPO family (and TRL's sft ignores it too).
    * Rewards come from the first loss with a reference-based implicit reward, else the first.
    * Metrics are merged; on a name clash the later one is stored as ``"<loss>/<metric>"``.
    * Per-pair ``batch.weights`` multiply each per-pair loss (once; each loss applies them).

    Raises ValueError for an unknown name, a reference-based loss without reference log-probs,
    ld_alpha without the public-part log-probs, or out-of-range parameters.
    """
    names = _names(types)
    if weights is None:
        loss_weights = [1.0] * len(names)
    else:
        loss_weights = [float(w) for w in weights]
        if len(loss_weights) != len(names):
            raise ValueError(
                f"Got {len(loss_weights)} loss weights for {len(names)} losses ({names}); "
                f"give one weight per loss."
            )
    _check_params(params)
    if not batch.has_reference:
        for name in names:
            if LOSSES[name].needs_reference:
                raise _missing_reference_error(name)

    ref_batch = batch
    if params.ld_alpha is not None and any(LOSSES[n].needs_reference for n in names):
        ref_batch = apply_ld_alpha(batch, params.ld_alpha)

    outputs = [
        LOSSES[n].fn(ref_batch if LOSSES[n].needs_reference else batch, params) for n in names
    ]

    total = outputs[0].losses * loss_weights[0]
    for out, w in zip(outputs[1:], loss_weights[1:]):
        total = total + out.losses * w

    reward_idx = next((i for i, n in enumerate(names) if LOSSES[n].needs_reference), 0)
    metrics: dict[str, torch.Tensor] = {}
    for name, out in zip(names, outputs):
        for key, value in out.metrics.items():
            metrics[f"{name}/{key}" if key in metrics else key] = value

    return LossOutput(
        losses=total,
        chosen_rewards=outputs[reward_idx].chosen_rewards,
        rejected_rewards=outputs[reward_idx].rejected_rewards,
        metrics=metrics,
    )


# --------------------------------------------------------------------------------------------
# the objective: what a run optimises, built once from the recipe's loss section


class Objective:
    """The losses a run optimises, their weights and parameters, and the state they carry.

    Built once from the recipe's loss section (`from_config`): every field of the section whose
    name is a field of :class:`LossParams` becomes a parameter, so a new loss knob is declared in
    those two places and nowhere else. Calling the objective on a :class:`PreferenceBatch`
    gives the combined :class:`LossOutput`.

    State: BCO's ``delta`` is the running mean of the implicit rewards over every pair trained on
    so far (TRL's RunningMoments); `observe` folds in each optimizer step's mean reward, and the
    checkpoint saves it (`state_dict`), so a resumed run continues with the same delta.
    """

    def __init__(self, names: Sequence[str], params: LossParams,
                 weights: Sequence[float] | None = None):
        self.names = tuple(_names(list(names)))
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        _check_params(params)
        self.params = params
        self.reward_count = 0  # pairs folded into params.bco_delta

    @classmethod
    def from_config(cls, loss: object) -> "Objective":
        """From any object with the loss section's attributes (`type`, `weights`, knobs)."""
        known = {f.name for f in fields(LossParams)}
        params = LossParams(**{k: getattr(loss, k) for k in known if hasattr(loss, k)})
        types = getattr(loss, "type")
        return cls([types] if isinstance(types, str) else list(types), params,
                   getattr(loss, "weights", None))

    @property
    def needs_reference(self) -> bool:
        return needs_reference(self.names)

    @property
    def sorts_across_pairs(self) -> bool:
        """Whether a pair's loss depends on the other pairs of its batch (AOT's quantiles)."""
        return any(n in ("aot", "aot_unpaired") for n in self.names)

    def __call__(self, batch: PreferenceBatch) -> LossOutput:
        return compute_loss(self.names, batch, self.params, self.weights)

    def observe(self, metrics: dict[str, float], pairs: int) -> None:
        """Fold an optimizer step's metrics into the objective's state (BCO's running mean)."""
        mean = metrics.get("bco_rewards_mean")
        if mean is None or pairs <= 0:
            return
        total = self.reward_count + pairs
        self.params.bco_delta += (mean - self.params.bco_delta) * pairs / total
        self.reward_count = total

    def state_dict(self) -> dict[str, float]:
        return {"bco_delta": self.params.bco_delta, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.params.bco_delta = float(state.get("bco_delta", 0.0))
        self.reward_count = int(state.get("reward_count", 0))

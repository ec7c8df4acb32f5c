"""The run records the methods return and the stages write, as types: AISP, best-of-N, MISVO, cost, curves.

A record is a plain ``dict`` at run time (a :class:`~typing.TypedDict` only tells the type checker
its keys and their types); the drivers build them as dict literals, and the stages write them as
JSON under ``results/`` (``samples.jsonl``, ``curve.json``; :func:`prelogit.io.write_json` sorts the
keys and drops the timing keys, :func:`prelogit.io.is_timing_key`).

- :class:`AISPRecord` (:func:`prelogit.aisp.run_aisp` / ``run_aisp_many``), with its
  :class:`AISPIteration` entries, its :class:`AISPBest` and its :class:`AISPFinalRollout`;
- :class:`BestOfNRecord` (:func:`prelogit.engine.run_best_of_n` / ``run_best_of_n_many``, and the
  non-adaptive samplers of :func:`prelogit.samplers.run_arm_many`), with its :class:`BestOfNBest`;
- :class:`MISVORecord` (:func:`prelogit.misvo.run_misvo` / ``run_misvo_many``), with its
  :class:`MISVOIteration` entries, its :class:`MISVOBest` and its :class:`MISVOFinalRollout`;
- :class:`CostRecord` (:meth:`prelogit.metrics.CostMeter.as_dict`), every record's ``cost``;
- :data:`CurveRow` (:func:`prelogit.runs.bon_curve`, :func:`prelogit.runs.aisp_curve`): a plain
  ``dict`` alias, because a curve row carries the judges' names as keys.

Keys that only some producers fill (``prompt_id``, ``prompt``, ``judges``, ``best_so_far_judges``, the
notebooks' ``reading`` and ``lit_lam``) are :data:`~typing.NotRequired`; each says who fills it.

Units: rewards and judge scores in their model's units; KL in nats; norms of controls in pre-logit
units (the LM head's input); lengths in generated tokens (EOS included); times in seconds.

Each kind of KL has a key of its own, so a key never changes meaning with its producer:

- ``kl_control``: the control-space KL(Q_U || P) = ||U||^2 / (2 sigma^2) of a Gaussian proposal
  mean U (:func:`prelogit.theory.kl_to_base`): :attr:`AISPIteration.kl_control` (and
  ``kl_control_final`` of :class:`AISPRecord`, the same quantity for the final U), and so the
  ``kl_control`` of :func:`prelogit.runs.aisp_curve`'s rows built from AISP records;
- ``kl_sequence``: Monte-Carlo terms of the sequence-level KL(pi || pi_ref) of a steered policy
  against the base model, each the exact token-level KL summed over one response's tokens:
  :attr:`AISPFinalRollout.kl_sequence` and :attr:`MISVOFinalRollout.kl_sequence`
  (:attr:`prelogit.sampling.Generation.kl`), :attr:`MISVOIteration.kl_sequence` (and its mean
  ``kl_sequence_mean``; :func:`prelogit.misvo.sequence_kl`), the ARGS and RE-Control records'
  ``kl_sequence`` (greedy: -log pi_ref(y), exact), and so the ``kl_sequence`` of ``aisp_curve``'s
  rows when the MISVO stage builds them from MISVO records;
- ``kl_bound``: the best-of-N bound log N - (N - 1) / N (:func:`prelogit.theory.kl_best_of_n`) of
  :func:`prelogit.runs.bon_curve`'s rows.

``tests/test_records.py`` checks that real records have exactly the keys declared here.
"""

from typing import Literal, NotRequired, TypedDict

# No ``from __future__ import annotations`` here: on Python 3.11, TypedDict only sees NotRequired in
# evaluated annotations, and __required_keys__ / __optional_keys__ (which the tests compare with real
# records) would otherwise list every key as required.


class CostRecord(TypedDict):
    """Compute spent on one prompt by one run: :meth:`prelogit.metrics.CostMeter.as_dict`.

    forward_calls: LM forward passes this prompt's rows took part in (its prefill counts once).
    new_tokens: tokens generated for this prompt, EOS included.
    generations: responses generated (selection draws and any final rollouts).
    reward_calls: texts scored by the optimised reward (a batch of k texts counts k).
    reward_batches: reward ``score`` calls that scored this prompt's texts.
    time_generation_s, time_reward_s: wall-clock seconds of generation and of reward scoring; a
        batched call's time is shared out to its prompts (by generated tokens, by texts scored).
    time_total_s: time_generation_s + time_reward_s.

    The three ``time_*`` keys are timing keys: :func:`prelogit.io.write_json` drops them from every
    file under ``results/`` but ``timing.json``.
    """

    forward_calls: int
    new_tokens: int
    generations: int
    reward_calls: int
    reward_batches: int
    time_generation_s: float
    time_reward_s: float
    time_total_s: float


# ---- AISP ---------------------------------------------------------------------------------------


class AISPConfigDict(TypedDict):
    """An :class:`prelogit.aisp.AISPConfig` as ``dataclasses.asdict`` writes it: an AISP record's ``config``.

    sigma: std of the control noise, pre-logit units. lam: lambda, reward units (``lam_mode``
    ``"absolute"``) or unit-free (``"std"``: a multiple of the within-chain reward sd).
    lam_mode: ``"absolute"`` or ``"std"``. alpha, alpha_mode: the update's coefficient and its
    reading (``"mppi"`` or ``"step"``, :func:`prelogit.control.likelihood_ratio_coefficient`).
    n: draws per iteration and chain. K: iterations. tau: controlled tokens (U is (tau, d)).
    B: chains. final_rollout: whether the run also generated from each chain's final mean (the
    record's ``final_rollout`` is then a dict, else None).
    """

    sigma: float
    lam: float
    lam_mode: str
    alpha: float
    alpha_mode: str
    n: int
    K: int
    tau: int
    B: int
    final_rollout: bool


class AISPBest(TypedDict):
    """The best response an AISP run has seen: the record's ``best`` and each iteration's ``best_so_far``.

    reward: its reward (optimised reward's units). response: its decoded text. iteration: the
    iteration k (1..K) that drew it. chain: the chain (0..B-1) that drew it. A later draw replaces
    it only with a strictly higher reward.
    """

    reward: float
    response: str
    iteration: int
    chain: int


class AISPIteration(TypedDict):
    """One AISP iteration k of one prompt (B chains of n draws each): an entry of ``iterations``.

    k: the iteration, 1..K.
    samples_so_far: B * n * k, the selection draws up to and including this iteration (the budget N
        at which ``best_so_far`` is AISP's answer); final rollouts are not counted.
    rewards: (B, n) the reward of each draw, reward units.
    responses: (B * n,) the decoded responses, chain-major: response i is draw i % n of chain i // n.
    lengths: (B * n,) generated tokens of each response, EOS included, in the order of ``responses``.
    weights: (B, n) the self-normalised importance weights of each chain's draws (each row sums to 1).
    ess: (B,) Kish's effective sample size 1 / sum_i w_i^2 of each chain's weights, in [1, n].
    lam_eff: (B,) the lambda each chain's weights used, reward units: ``lam`` (``lam_mode``
        ``"absolute"``) or ``lam`` times the chain's population sd of its n rewards, floored at 1e-8 (``"std"``).
    U_norm: (B,) ||U|| (Frobenius norm of the (tau, d) mean, pre-logit units) of each chain's mean
        *after* this iteration's update.
    kl_control: (B,) per chain, the control-space KL(Q_U || P) = ||U||^2 / (2 sigma^2), in nats, of the
        Gaussian proposal Q_U = N(U, sigma^2 I) against P = N(0, sigma^2 I)
        (:func:`prelogit.theory.kl_to_base`), for the mean U *after* this iteration's update, i.e.
        the proposal of iteration k + 1, not the one that drew this iteration's samples. Not a KL
        between response distributions and not against the base model pi_ref: by data processing
        it bounds the KL between the response distributions that V ~ Q_U and V ~ P (the
        noise-perturbed sampler) induce.
    sd_reward_term, sd_lr_term: (B,) the population sds over the chain's n draws of the two terms
        of the log-weights, r / lam_eff and the likelihood-ratio term
        (:func:`prelogit.control.log_weight_terms`, with U before the update); log-weight units
        (nats, unit-free).
    best_so_far: a copy of the run's :class:`AISPBest` after this iteration.
    """

    k: int
    samples_so_far: int
    rewards: list[list[float]]
    responses: list[str]
    lengths: list[int]
    weights: list[list[float]]
    ess: list[float]
    lam_eff: list[float]
    U_norm: list[float]
    kl_control: list[float]
    sd_reward_term: list[float]
    sd_lr_term: list[float]
    best_so_far: AISPBest


class AISPFinalRollout(TypedDict):
    """One response per chain generated from the chain's final mean U without noise (logged, never selected).

    responses: (B,) the decoded responses. rewards: (B,) their rewards, reward units.
    kl_sequence: (B,) per response, :attr:`prelogit.sampling.Generation.kl`: the sum over its generated
        tokens (EOS included) of the exact token-level KL(q_t || p_t), in nats, between the steered
        next-token distribution q_t and the unsteered model's sampling distribution p_t
        (temperature, top-k and top-p applied) on the same prefix. With ``sample`` decoding it is
        one Monte-Carlo term of the sequence-level KL(pi_U || pi_ref) (their mean over responses
        estimates it); with ``greedy`` decoding q_t is a point mass and the term is
        -log pi_ref(y), the exact KL of that deterministic policy. +inf where q_t puts mass on a
        token that top-k or top-p removed from p_t. Not the control-space KL of
        :attr:`AISPIteration.kl_control`.
    """

    responses: list[str]
    rewards: list[float]
    kl_sequence: list[float]


class AISPRecord(TypedDict):
    """One prompt's AISP run: :func:`prelogit.aisp.run_aisp` (one per prompt from ``run_aisp_many``).

    method: ``"aisp"`` (the frozen-U twin, :func:`prelogit.aisp.frozen_twin`, is an AISP run too).
    config: the run's configuration (:class:`AISPConfigDict`).
    samples_used: B * n * K, the selection budget (final rollouts not counted).
    best: the best response of all chains and iterations (:class:`AISPBest`).
    iterations: (K,) one :class:`AISPIteration` per iteration.
    final_rollout: :class:`AISPFinalRollout` (sequence-level Monte-Carlo KL terms), or None when
        ``config["final_rollout"]`` is False.
    kl_control_final: (B,) per chain, the control-space KL(Q_U || P) = ||U||^2 / (2 sigma^2), in nats, of
        the final mean U (:func:`prelogit.theory.kl_to_base`): the same quantity for the same U as
        the last iteration's ``kl_control``.
    cost: the compute spent on this prompt (:class:`CostRecord`).
    prompt_id: the prompt's id; filled by :func:`prelogit.runs.aisp_records` (and the stages),
        not by the engine.
    prompt: the raw user turn (the text the reward sees, not the templated prompt); filled by
        :func:`prelogit.runs.aisp_records`.
    best_so_far_judges: (K,) per iteration, judge name -> that judge's score of ``best_so_far``'s
        response; filled by :func:`prelogit.runs.aisp_records`.
    reading: the decoding given V the run used (``"sample"`` or ``"greedy"``); filled by the aisp
        and transfer notebooks.
    lit_lam: the literature configuration's lambda; filled by the aisp notebook's literature runs.
    """

    method: Literal["aisp"]
    config: AISPConfigDict
    samples_used: int
    best: AISPBest
    iterations: list[AISPIteration]
    final_rollout: AISPFinalRollout | None
    kl_control_final: list[float]
    cost: CostRecord
    prompt_id: NotRequired[str]
    prompt: NotRequired[str]
    best_so_far_judges: NotRequired[list[dict[str, float]]]
    reading: NotRequired[str]
    lit_lam: NotRequired[float]


# ---- best-of-N ----------------------------------------------------------------------------------


class BestOfNBest(TypedDict):
    """best-of-N's answer: the record's ``best``.

    reward: the highest reward of the N draws, reward units. response: that draw's text.
    index: its position in the record's ``rewards`` / ``responses`` (0..N-1).
    """

    reward: float
    response: str
    index: int


class BestOfNRecord(TypedDict):
    """One prompt's N draws and their best: :func:`prelogit.engine.run_best_of_n` (and ``run_best_of_n_many``).

    The non-adaptive samplers (:func:`prelogit.samplers.run_arm_many`) return the same record with
    ``method`` ``"sampler"`` and their ``arm``. No KL is recorded: best-of-N's KL is the bound of
    :func:`prelogit.theory.kl_best_of_n`, which :func:`prelogit.runs.bon_curve` writes into its rows.

    method: ``"bon"`` (base-model sampling) or ``"sampler"`` (a sampler arm).
    N: draws per prompt. samples_used: N.
    rewards: (N,) the reward of each draw in draw order, reward units (every draw is kept, so that
        best-of-N' for N' <= N is estimated from the same draws, :func:`prelogit.metrics.expected_best_of_n`).
    responses: (N,) the decoded draws. lengths: (N,) generated tokens of each, EOS included.
    best: the best draw (:class:`BestOfNBest`).
    cost: the compute spent on this prompt (:class:`CostRecord`).
    arm: the sampler arm's label (:attr:`prelogit.samplers.SamplerArm.label`); filled by
        :func:`prelogit.samplers.run_arm_many` only.
    prompt_id: the prompt's id; filled by :func:`prelogit.runs.best_of_n_records`,
        :func:`prelogit.replicate.sampler_records`, :func:`prelogit.search.validation_best_of_n`
        and the stages, not by the engine.
    prompt: the raw user turn; filled by ``runs.best_of_n_records`` and ``replicate.sampler_records``.
    judges: judge name -> (N,) that judge's score of each draw; filled by ``runs.best_of_n_records``
        and ``replicate.sampler_records``.
    """

    method: Literal["bon", "sampler"]
    N: int
    samples_used: int
    rewards: list[float]
    responses: list[str]
    lengths: list[int]
    best: BestOfNBest
    cost: CostRecord
    arm: NotRequired[str]
    prompt_id: NotRequired[str]
    prompt: NotRequired[str]
    judges: NotRequired[dict[str, list[float]]]


# ---- MISVO --------------------------------------------------------------------------------------


class MISVOConfigDict(TypedDict):
    """A :class:`prelogit.misvo.MISVOConfig` as ``dataclasses.asdict`` writes it: a MISVO record's ``config``.

    eta: learning rate of the gradient ascent on u. lam: weight of the Fisher penalty, reward
    units. K: responses per step. steps: the number of steps (budget K * steps). fisher: ``"reference"`` or ``"identity"``.
    final_rollout: whether the run also generated from the final u (the record's
    ``final_rollout`` is then a dict, else None).
    """

    eta: float
    lam: float
    K: int
    steps: int
    fisher: str
    final_rollout: bool


class MISVOBest(TypedDict):
    """The best response a MISVO run has seen: the record's ``best`` and each step's ``best_so_far``.

    reward: its reward, reward units. response: its text. step: the step k (1..steps) that drew it.
    index: its position (0..K-1) among that step's K responses. A later draw replaces it only with
    a strictly higher reward.
    """

    reward: float
    response: str
    step: int
    index: int


class MISVOIteration(TypedDict):
    """One MISVO step k of one prompt (K responses drawn with the current steering u): an entry of ``iterations``.

    k: the step, 1..steps. samples_so_far: K * k.
    rewards: (K,) the reward of each response, reward units.
    responses: (K,) the decoded responses. lengths: (K,) generated tokens of each, EOS included.
    u_norm: ||u|| (Frobenius norm of the (T, d) steering, pre-logit units) of the control these
        responses were drawn with (before the update; 0 at step 1).
    grad_norm: ||g|| of the leave-one-out score-function gradient (:func:`prelogit.misvo.score_gradient`).
    kl_sequence: (K,) per response, the sum over its generated tokens (EOS included) of the exact
        token-level KL(pi_u || pi_ref) at the sampler's temperature, untruncated (MISVO runs with
        top-k and top-p off), in nats (:func:`prelogit.misvo.sequence_kl`): one Monte-Carlo term of
        the sequence-level KL of the policy that drew this step's responses (u before the
        update; 0 at step 1, where u = 0). Computed by MISVO from the recorded pre-logits, not
        by the sampler; not a control-space KL.
    kl_sequence_mean: the mean of ``kl_sequence`` over the K responses (the Monte-Carlo estimate), nats.
    best_so_far: a copy of the run's :class:`MISVOBest` after this step.
    u_norm_next: ||u|| after this step's update, pre-logit units.
    """

    k: int
    samples_so_far: int
    rewards: list[float]
    responses: list[str]
    lengths: list[int]
    u_norm: float
    grad_norm: float
    kl_sequence: list[float]
    kl_sequence_mean: float
    best_so_far: MISVOBest
    u_norm_next: float


class MISVOFinalRollout(TypedDict):
    """One response generated (sampled) from the final u (logged, never selected).

    responses: (1,) the decoded response. rewards: (1,) its reward, reward units.
    kl_sequence: (1,) :attr:`prelogit.sampling.Generation.kl` of the response, recorded by the sampler: the
        sum over its tokens of the exact token-level KL(pi_u || pi_ref), nats, one Monte-Carlo
        term of the sequence-level KL (as :attr:`AISPFinalRollout.kl_sequence`, with ``sample`` decoding).
    u_norm: ||u|| of the final steering, pre-logit units.
    """

    responses: list[str]
    rewards: list[float]
    kl_sequence: list[float]
    u_norm: float


class MISVORecord(TypedDict):
    """One prompt's MISVO run: :func:`prelogit.misvo.run_misvo` (one per prompt from ``run_misvo_many``).

    method: ``"misvo"``. config: the run's configuration (:class:`MISVOConfigDict`).
    samples_used: K * steps (the first step's reference rollouts included).
    best: the best response of all steps (:class:`MISVOBest`).
    iterations: (N,) one :class:`MISVOIteration` per step.
    final_rollout: :class:`MISVOFinalRollout`, or None when ``config["final_rollout"]`` is False.
    cost: the compute spent on this prompt (:class:`CostRecord`).
    prompt_id, prompt, best_so_far_judges: as in :class:`AISPRecord` (``best_so_far_judges``: (N,)
        per step); filled by the misvo notebook, not by the driver.
    """

    method: Literal["misvo"]
    config: MISVOConfigDict
    samples_used: int
    best: MISVOBest
    iterations: list[MISVOIteration]
    final_rollout: MISVOFinalRollout | None
    cost: CostRecord
    prompt_id: NotRequired[str]
    prompt: NotRequired[str]
    best_so_far_judges: NotRequired[list[dict[str, float]]]


#: A record of an adaptive search: what :func:`prelogit.tune.run_arms` returns per (arm, prompt)
#: pair, and what :func:`prelogit.runs.aisp_curve` reads (the misvo stage passes it MISVO records).
SearchRecord = AISPRecord | MISVORecord


# ---- curves -------------------------------------------------------------------------------------

#: One row of a reward-vs-samples curve (a stage's ``curve.json``), for one prompt at one budget:
#: :func:`prelogit.runs.bon_curve` and :func:`prelogit.runs.aisp_curve`. A plain dict, not a
#: TypedDict: besides its fixed keys a row has one key per judge, named by the judge, which a
#: TypedDict cannot declare. Keys:
#:
#: - ``N`` (int): the budget, samples used for selection. ``prompt_id`` (str).
#: - ``reward`` (float, reward units): best-of-N: the unbiased estimate of E[reward of the best of
#:   N draws] (:func:`prelogit.metrics.expected_best_of_n`); AISP (and MISVO): the best-so-far
#:   reward after the iteration whose ``samples_so_far`` is N.
#: - one KL (float, nats), under the key of its kind: ``kl_bound`` (best-of-N): the bound
#:   log N - (N - 1) / N (:func:`prelogit.theory.kl_best_of_n`), the same for every prompt;
#:   ``kl_control`` (AISP records): the mean over chains of the iteration's control-space
#:   KL(Q_U || P) of the mean after the update (:attr:`AISPIteration.kl_control`); ``kl_sequence``
#:   (MISVO records): the mean over the step's K responses of the Monte-Carlo sequence-level KL
#:   terms (:attr:`MISVOIteration.kl_sequence`).
#: - one float per judge name: best-of-N: the expected judge score of the reward-selected draw;
#:   AISP / MISVO: the judge's score of the best-so-far response.
#: - ``reading`` (str): the decoding given V, added by :func:`prelogit.replicate.run_seed`'s curves and
#:   the aisp and transfer notebooks; ``lit_lam`` (float): added by the aisp notebook's literature curves.
CurveRow = dict[str, float | int | str]

#: The keys of a curve row that are not a judge's name: its fixed keys, the three KL keys (a row has
#: one) and the labels some stages add (:func:`prelogit.runs.curve_judges`).
CURVE_KEYS = frozenset({"N", "prompt_id", "reward", "kl_bound", "kl_control", "kl_sequence", "reading", "lit_lam"})


__all__ = ["CostRecord", "AISPConfigDict", "AISPBest", "AISPIteration", "AISPFinalRollout", "AISPRecord",
           "BestOfNBest", "BestOfNRecord", "MISVOConfigDict", "MISVOBest", "MISVOIteration", "MISVOFinalRollout",
           "MISVORecord", "SearchRecord", "CurveRow", "CURVE_KEYS"]

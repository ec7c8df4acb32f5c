"""Budget-aware choice of AISP's configuration: candidate arms and successive halving.

Search space. An *arm* is one AISP configuration at a fixed sample budget N, given by the factors
``sigma_rms`` (the noise std in units of the RMS of the pre-logit coordinates, so that it carries
over between models), ``lam`` with ``lam_mode`` (``absolute``: reward units; ``std``: units of the
within-iteration reward std), ``alpha`` with ``alpha_mode`` (``mppi`` or ``step``, see
:func:`prelogit.control.likelihood_ratio_coefficient`), ``tau`` (controlled tokens, or ``"full"``
for all ``max_new_tokens``), ``n`` (samples per iteration; K = N / n iterations, one chain) and
``decode`` (``sample`` or ``greedy`` decoding given the control). :func:`arm_config` turns an arm
into an :class:`~prelogit.aisp.AISPConfig`.

Arms (:func:`candidate_arms`). A *center* arm, then one-factor-at-a-time variations: for every
value of every sweep, the center with that single factor (or mode and value, for lambda and
alpha) changed; then ``n_random`` seeded random arms, each factor drawn independently among the
values that appear for it in the center and the sweeps, so that interactions between factors get
a few looks too. Duplicates are dropped (the first one is kept).

Successive halving (:func:`successive_halving`). ``rungs`` are cumulative prompt counts. All arms
run on the first ``rungs[0]`` prompts; after each rung the arms are ranked by their mean score over
every prompt seen so far and the best ``ceil(alive / eta)`` go on to the next prompts. All arms alive
at a rung have seen the same prompts, so the ranking compares them on paired data; with common
random numbers (:func:`run_arms`: every arm draws its noise and tokens on a prompt from the same
generator) the pairing also removes much of the sampling noise from the differences. Most of the
budget thus goes to the promising arms, and the selected arm's estimate uses all prompts of the
last rung.

Score. The score of an (arm, prompt) pair is computed by the caller's ``evaluate`` from the
record :func:`run_arms` returns; the tune stage uses the reward of the response AISP selects
(``record["best"]["reward"]``) minus the best-of-N reward at the same budget N on the same prompt,
so that prompts of different difficulty weigh alike and a positive mean means "better than
best-of-N". Higher is better.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .aisp import AISPConfig, run_aisp_many
from .engine import prompt_generator
from .misvo import MISVOConfig, run_misvo_many
from .checks import ParameterError, check_number
from .params import ARM_KEYS, mapping_of
from .records import SearchRecord
from .rewards import RewardModel
from .sampling import PrelogitSampler

#: The factors of an arm (every key but ``label``).
FACTORS = ("sigma_rms", "lam", "lam_mode", "alpha", "alpha_mode", "tau", "n", "decode")

#: Sweep keys -> (factor, mode): the mode is set along with the value for lambda and alpha.
SWEEPS: dict[str, tuple[str, str | None]] = {
    "sigma_rms": ("sigma_rms", None), "lam_absolute": ("lam", "absolute"), "lam_std": ("lam", "std"),
    "alpha_mppi": ("alpha", "mppi"), "alpha_step": ("alpha", "step"), "tau": ("tau", None), "n": ("n", None),
    "decode": ("decode", None)}

#: The mode factor that goes with a factor that has modes.
MODE_OF = {"lam": "lam_mode", "alpha": "alpha_mode"}


#: Every factor present and valid (an optional ``label`` aside), else a ParameterError naming the key.
_arm_check = mapping_of(ARM_KEYS, extra=("label",))


def _check_arm(arm: dict, name: str) -> None:
    _arm_check(name, arm)


def _factors(arm: dict) -> tuple:
    """The arm without its label, as a hashable key (for dropping duplicates)."""
    return tuple(arm[f] for f in FACTORS)


def _unique(values: list) -> list:
    """``values`` without repeats, in first-seen order."""
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def candidate_arms(center: dict, sweeps: dict[str, list], n_random: int, seed: int) -> list[dict]:
    """The arms of the search: the center, its one-factor variations, and seeded random arms.

    Args:
        center: every factor of an arm (``sigma_rms, lam, lam_mode, alpha, alpha_mode, tau, n,
            decode``); any ``label`` in it is replaced by ``"center"``.
        sweeps: values to try, per key among :data:`SWEEPS`: ``sigma_rms``, ``tau``, ``n`` and
            ``decode`` change that factor; ``lam_absolute`` / ``lam_std`` set ``lam`` with
            ``lam_mode`` absolute / std; ``alpha_mppi`` / ``alpha_step`` set ``alpha`` with
            ``alpha_mode`` mppi / step. Variations come in the order of ``sweeps``.
        n_random: number of random arms, labelled ``random-1`` ... in the order drawn (a drawn arm
            equal to an earlier arm is dropped, so a label may be missing).
        seed: seed of the random arms (``random.Random(seed)``).
    Returns:
        Arms (dicts with ``label`` and the factors), the center first, without duplicates (same
        factors, labels aside; the first is kept). Labels: ``center``, ``sigma_rms=0.5``,
        ``lam(absolute)=0.001``, ``alpha(step)=0.9``, ``tau=full``, ``n=32``, ``decode=greedy``,
        ``random-1``.
    Raises:
        ParameterError: an unknown sweep key (the message lists the allowed ones), a missing or
            invalid factor, or a sweep that is not a list.
    """
    _check_arm(center, "center")
    check_number("n_random", n_random, low=0, integer=True)
    check_number("seed", seed, integer=True)
    if not isinstance(sweeps, dict):
        raise ParameterError(f"sweeps must be a mapping of sweep key to a list of values, got {sweeps!r}")
    for key, values in sweeps.items():
        if key not in SWEEPS:
            raise ParameterError(f"unknown sweep key {key!r}; allowed: {', '.join(SWEEPS)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ParameterError(f"sweep {key} must be a list of values, got {values!r}")

    base = {"label": "center", **{f: center[f] for f in FACTORS}}
    arms = [base]
    for key, values in sweeps.items():
        factor, mode = SWEEPS[key]
        for v in values:
            arm = dict(base, **{factor: v})
            if mode is not None:
                arm[MODE_OF[factor]] = mode
                arm["label"] = f"{factor}({mode})={v}"
            else:
                arm["label"] = f"{factor}={v}"
            _check_arm(arm, f"sweep {key}")
            arms.append(arm)

    # The values each factor may take in a random arm; lambda and alpha: per mode.
    allowed: dict[str, Any] = {f: _unique([center[f]] + list(sweeps.get(f, []))) for f in ("sigma_rms", "tau", "n", "decode")}
    for factor, mode_key in MODE_OF.items():
        by_mode: dict[str, list] = {center[mode_key]: [center[factor]]}
        for key, (f, mode) in SWEEPS.items():
            if f == factor and sweeps.get(key):
                assert mode is not None  # the sweeps of a factor with modes (lam, alpha) each carry one
                by_mode[mode] = _unique(by_mode.get(mode, []) + list(sweeps[key]))
        allowed[factor] = by_mode
    rng = random.Random(seed)
    for i in range(1, n_random + 1):
        drawn: dict[str, Any] = {}
        for f in ("sigma_rms", "lam", "alpha", "tau", "n", "decode"):  # a fixed draw order
            if f in MODE_OF:  # the mode first, then a value of that mode
                drawn[MODE_OF[f]] = rng.choice(list(allowed[f]))
                drawn[f] = rng.choice(allowed[f][drawn[MODE_OF[f]]])
            else:
                drawn[f] = rng.choice(allowed[f])
        arms.append({"label": f"random-{i}", **{f: drawn[f] for f in FACTORS}})

    out, seen = [], set()
    for arm in arms:
        arm_key = _factors(arm)
        if arm_key not in seen:
            seen.add(arm_key)
            out.append(arm)
    return out


def arm_config(arm: dict, rms: float, max_new_tokens: int, N: int) -> AISPConfig:
    """The :class:`AISPConfig` of ``arm`` at budget N: one chain, K = N / n, no final rollout.

    Args:
        arm: an arm of :func:`candidate_arms` (its ``decode`` is not part of the config).
        rms: the RMS of the pre-logit coordinates; sigma = sigma_rms * rms.
        max_new_tokens: the sampler's; ``tau = "full"`` means this many tokens.
        N: the sample budget; it must be a multiple of the arm's n.
    Raises:
        ParameterError: tau > max_new_tokens, N not a multiple of n, or an invalid factor.
    """
    name = f"arm {arm.get('label', '?')!r}" if isinstance(arm, dict) else "arm"
    _check_arm(arm, name)
    check_number("rms", rms, low=0, low_open=True)
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    check_number("N", N, low=1, integer=True)
    tau = max_new_tokens if arm["tau"] == "full" else arm["tau"]
    if tau > max_new_tokens:
        raise ParameterError(f"{name}: tau must be at most max_new_tokens = {max_new_tokens} (AISP controls only "
                             f"generated tokens), got tau = {tau}")
    n = arm["n"]
    if N % n:
        raise ParameterError(f"{name}: the budget N = {N} is not a multiple of n = {n} (N = n x K)")
    return AISPConfig(sigma=arm["sigma_rms"] * rms, lam=arm["lam"], lam_mode=arm["lam_mode"], alpha=arm["alpha"],
                      alpha_mode=arm["alpha_mode"], n=n, K=N // n, tau=tau, B=1, final_rollout=False)


Evaluate = Callable[[list[int], list[str]], dict[tuple[int, str], float]]


def selected_variants(selected: Mapping[str, Any], max_new_tokens: int, N: int, final_rollout: bool,
                      sigma: float | None = None) -> dict[str, dict[str, Any]]:
    """Each reading's AISP variant at budget ``N``, as the tune stage selected it (``results/tune/selected.json``).

    ``sigma`` (``aisp.sigma``), when given, pins every reading's sigma (pre-logit units) instead of the tuned
    one, sigma_rms x the pre-logit RMS that the tune stage measured.

    Returns:
        ``{reading: {"selected": its entry of the file, "cfg": its :class:`AISPConfig` (:func:`arm_config`
        with ``final_rollout``, and ``sigma`` if given), "decode": its decoding given V}}``, in the file's
        order of the readings.
    """
    variants = {}
    for reading, sel in selected["readings"].items():
        cfg = replace(arm_config(sel["arm"], sel["rms"], max_new_tokens, N), final_rollout=final_rollout)
        if sigma is not None:
            check_number("aisp.sigma", sigma, low=0, low_open=True)
            cfg = replace(cfg, sigma=sigma)
        variants[reading] = {"selected": sel, "cfg": cfg, "decode": sel["decode"]}
    return variants


def successive_halving(n_arms: int, prompt_ids: list[str], rungs: list[int], eta: int, evaluate: Evaluate) -> dict:
    """Successive halving of ``n_arms`` arms over growing sets of prompts.

    Args:
        n_arms: the arms are 0 .. n_arms - 1.
        prompt_ids: the prompts, in the order they are used (distinct).
        rungs: cumulative prompt counts, strictly increasing, the last at most ``len(prompt_ids)``.
        eta: after each rung ``ceil(alive / eta)`` arms (at least 1) go on; an integer >= 2.
        evaluate: ``evaluate(arm_indices, new_prompt_ids)`` returns the score (higher is better)
            of every requested (arm, prompt) pair as ``{(arm, prompt_id): score}``; it is called
            once per rung, with the arms alive there and the rung's new prompts, so that the
            caller can batch them.
    Returns:
        ``rungs``: per rung, ``{"rung": i, "prompts": cumulative prompt count, "arms": the arms
        alive there (ascending), "means": {arm: mean score over the rung's prompts}}``;
        ``scores``: ``{arm: {prompt_id: score}}`` for every evaluated pair; ``selected``: the
        arm of best mean at the last rung; ``evaluations``: the number of (arm, prompt) pairs
        evaluated. Ties rank the lower arm index first. An arm left alone before the last rung
        is still evaluated on the remaining rungs, so the selected arm's mean always covers the
        ``rungs[-1]`` prompts.
    Raises:
        ParameterError: bad n_arms, eta, rungs or prompt ids; ValueError: ``evaluate`` left out
        a requested pair or gave a score that is not a finite number.
    """
    check_number("n_arms", n_arms, low=1, integer=True)
    check_number("eta", eta, low=2, integer=True)
    prompt_ids = list(prompt_ids)
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ParameterError("prompt_ids must be distinct")
    if isinstance(rungs, (str, bytes)) or not isinstance(rungs, Sequence) or not rungs:
        raise ParameterError(f"rungs must be a non-empty list of cumulative prompt counts, got {rungs!r}")
    for i, r in enumerate(rungs):
        check_number(f"rungs[{i}]", r, low=1, integer=True)
    if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[-1] > len(prompt_ids):
        raise ParameterError(f"rungs = {list(rungs)} must increase strictly and end at most at the number of "
                             f"prompts, {len(prompt_ids)} (they are cumulative prompt counts)")

    alive = list(range(n_arms))
    scores: dict[int, dict[str, float]] = {a: {} for a in alive}
    history, evaluations, done = [], 0, 0
    for i, r in enumerate(rungs):
        new = prompt_ids[done:r]
        got = evaluate(list(alive), list(new))
        for a in alive:
            for p in new:
                if (a, p) not in got:
                    raise ValueError(f"evaluate gave no score for arm {a} on prompt {p!r} (rung {i})")
                s = got[(a, p)]
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                    raise ValueError(f"evaluate gave score {s!r} for arm {a} on prompt {p!r}; scores must be finite numbers")
                scores[a][p] = float(s)
        evaluations += len(alive) * len(new)
        seen = prompt_ids[:r]
        means = {a: sum(scores[a][p] for p in seen) / len(seen) for a in alive}
        history.append({"rung": i, "prompts": r, "arms": list(alive), "means": means})
        ranked = sorted(alive, key=lambda a: (-means[a], a))
        if i < len(rungs) - 1:
            alive = sorted(ranked[:max(1, math.ceil(len(alive) / eta))])
        done = r
    return {"rungs": history, "scores": scores, "selected": ranked[0],
            "evaluations": evaluations}


READINGS = ("sample", "greedy")


def reading_arms(center: dict, sweeps: dict[str, list], readings: Sequence[str], n_random: int,
                 seed: int) -> tuple[list[dict], dict[str, list[int]]]:
    """The arms of one search per reading of the decoding given V, in one list.

    The decoding given V (``sample`` or ``greedy``, spec section 1) defines the sampler, so each
    reading is its own AISP variant: its arms are :func:`candidate_arms` of the center with that
    decoding, and the tune stage runs successive halving within each reading, never between them.

    Args:
        center: the factors of the center arm except ``decode`` (a ``decode`` in it is replaced).
        sweeps: as for :func:`candidate_arms`, without ``decode``.
        readings: the readings, distinct, each ``sample`` or ``greedy``.
        n_random, seed: as for :func:`candidate_arms` (the same random arms in every reading).
    Returns:
        (arms, blocks): every reading's arms in the order of ``readings``, each labelled
        ``"<reading>: <label>"`` and its center first; ``blocks[reading]`` the indices of its arms.
    Raises:
        ParameterError: an unknown or repeated reading, no reading, or a ``decode`` sweep.
    """
    if isinstance(readings, (str, bytes)) or not readings or len(set(readings)) != len(readings) \
            or any(r not in READINGS for r in readings):
        raise ParameterError(f"tune.readings must be distinct values among {', '.join(READINGS)}, got {readings!r}")
    if "decode" in sweeps:
        raise ParameterError("the decoding given V is a reading (tune.readings), not a sweep; drop the decode sweep")
    arms: list[dict] = []
    blocks: dict[str, list[int]] = {}
    for reading in readings:
        block = candidate_arms({**center, "decode": reading}, sweeps, n_random, seed)
        blocks[reading] = list(range(len(arms), len(arms) + len(block)))
        arms += [{**a, "label": f"{reading}: {a['label']}"} for a in block]
    return arms, blocks


def halving_within(block: Sequence[int], prompt_ids: list[str], rungs: list[int], eta: int,
                   evaluate: Evaluate) -> dict:
    """:func:`successive_halving` over the arms ``block`` (indices into a longer arm list).

    One search per reading runs over that reading's arms only (see :func:`reading_arms`), while
    ``evaluate`` and the returned search use the indices of the whole list: ``rungs`` (their
    ``arms`` and ``means``), ``scores`` and ``selected`` name arms by their index in it.
    """
    block = list(block)

    def local(js: list[int], pids: list[str]) -> dict[tuple[int, str], float]:
        got = evaluate([block[j] for j in js], pids)
        return {(j, pid): got[(block[j], pid)] for j in js for pid in pids}

    s = successive_halving(len(block), prompt_ids, rungs, eta, local)
    return {"rungs": [{**r, "arms": [block[a] for a in r["arms"]], "means": {block[a]: m for a, m in r["means"].items()}}
                      for r in s["rungs"]],
            "scores": {block[a]: v for a, v in s["scores"].items()}, "selected": block[s["selected"]],
            "evaluations": s["evaluations"]}


def claim_arms(arms: list[dict]) -> list[int]:
    """Indices of the arms the paper's hyper-parameter claims compare, all one-factor variations of
    the center (``arms[0]``): the center, every arm that changes only sigma, the smallest and the
    largest alpha of each reading, and the smallest absolute lambda. The tune stage runs them all on
    the same first prompts, whatever successive halving did with them, so that each claim is a
    paired contrast on enough prompts.
    """
    center = arms[0]

    def only(a: dict, keys: set) -> bool:
        return all(a[k] == center[k] for k in FACTORS if k not in keys) and any(a[k] != center[k] for k in keys)

    out = {0}
    out |= {i for i, a in enumerate(arms) if only(a, {"sigma_rms"})}
    for mode in ("mppi", "step"):
        al = [i for i, a in enumerate(arms) if (only(a, {"alpha", "alpha_mode"}) or i == 0)
              and a["alpha_mode"] == mode]
        if al:
            out |= {min(al, key=lambda i: arms[i]["alpha"]), max(al, key=lambda i: arms[i]["alpha"])}
    lam = [i for i, a in enumerate(arms) if only(a, {"lam"}) and a["lam_mode"] == "absolute"]
    if lam:
        out.add(min(lam, key=lambda i: arms[i]["lam"]))
    return sorted(out)


def one_factor_arms(center: dict, sweeps: dict[str, list]) -> list[dict]:
    """The center and its one-factor-at-a-time variations, for a search without modes (MISVO's).

    Args:
        center: the factors of the center arm (any ``label`` in it is replaced by ``"center"``).
        sweeps: per factor of the center, the values to try instead (each gives one arm,
            labelled ``factor=value``), in the order given.
    Returns:
        Arms (dicts with ``label`` and the factors), the center first, without duplicates (same
        factors, labels aside; the first is kept).
    Raises:
        ParameterError: a sweep key that is not a factor of the center, or a sweep that is not a list.
    """
    if not isinstance(center, dict) or not isinstance(sweeps, dict):
        raise ParameterError("center and sweeps must be mappings")
    factors = [k for k in center if k != "label"]
    arms = [{"label": "center", **{f: center[f] for f in factors}}]
    for key, values in sweeps.items():
        if key not in factors:
            raise ParameterError(f"unknown sweep key {key!r}; allowed: {', '.join(factors)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ParameterError(f"sweep {key} must be a list of values, got {values!r}")
        arms += [dict(arms[0], **{key: v}, label=f"{key}={v}") for v in values]
    out, seen = [], set()
    for arm in arms:
        arm_key = tuple(arm[f] for f in factors)
        if arm_key not in seen:
            seen.add(arm_key)
            out.append(arm)
    return out


def _lockstep_key(cfg: AISPConfig | MISVOConfig, decode: str | None) -> tuple:
    """The fields one lockstep call must share (with the decode mode), method name first."""
    if isinstance(cfg, AISPConfig):
        return ("aisp", cfg.n, cfg.K, cfg.B, cfg.final_rollout, str(decode))
    return ("misvo", cfg.K, cfg.steps, cfg.final_rollout, str(decode))


def _lockstep_groups(configs: list[tuple[AISPConfig | MISVOConfig, str | None]], pairs: Sequence[tuple[int, str]],
                     prompt_ids: Container[str]) -> dict[tuple, list[tuple[int, str]]]:
    """The distinct (config index, prompt id) pairs grouped by :func:`_lockstep_key`, in the order given
    within a group; each pair checked against ``configs`` and ``prompt_ids`` (ParameterError)."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for pair in dict.fromkeys((int(i), p) for i, p in pairs):
        i, pid = pair
        if not 0 <= i < len(configs):
            raise ParameterError(f"pair {pair}: config index {i} is out of range (0 .. {len(configs) - 1})")
        if pid not in prompt_ids:
            raise ParameterError(f"pair {pair}: prompt id {pid!r} is not in prompt_rows")
        cfg, decode = configs[i]
        if not isinstance(cfg, (AISPConfig, MISVOConfig)):
            raise ParameterError(f"configs[{i}] must be (AISPConfig or MISVOConfig, decode), got {configs[i]!r}")
        groups.setdefault(_lockstep_key(cfg, decode), []).append(pair)
    return groups


def run_arms(sampler: PrelogitSampler, reward: RewardModel, configs: list[tuple[AISPConfig | MISVOConfig, str | None]],
             prompt_rows: list[dict], pairs: list[tuple[int, str]], seed: int,
             max_prompts: int | None = None) -> dict[tuple[int, str], SearchRecord]:
    """AISP (or MISVO) for every (config index, prompt id) pair, batched across arms and prompts.

    Pairs are grouped by the fields one lockstep call must share (AISP: n, K, B, final_rollout and
    decode; MISVO: K, N, final_rollout and decode); each group is one
    :func:`~prelogit.aisp.run_aisp_many` (or :func:`~prelogit.misvo.run_misvo_many`) call, or
    several of at most ``max_prompts`` pairs each, with per-prompt configs, a prompt repeated once
    per arm. Groups run in sorted order of that key, pairs in the order given. Every pair's
    generator is ``prompt_generator(seed, prompt_id)``: the arms see the same random numbers on
    the same prompt (common random numbers), and a pair's record does not depend on its group or batch.

    Args:
        sampler, reward: as for :func:`~prelogit.aisp.run_aisp_many`.
        configs: (config, decode) per arm, e.g. ``(arm_config(arm, ...), arm["decode"])``; AISP and
            MISVO configs may be mixed.
        prompt_rows: dicts with ``id`` (distinct), ``prompt`` (templated, for the LM) and ``text``
            (the user turn the reward sees).
        pairs: the (config index, prompt id) pairs to run; repeats are run once.
        seed: the run seed of the generators.
        max_prompts: at most this many pairs per sampler call (None: a whole group at once),
            to bound the prefill's memory; the records do not depend on it.
    Returns:
        ``{(config index, prompt id): record}``, each record as :func:`~prelogit.aisp.run_aisp`
        (or :func:`~prelogit.misvo.run_misvo`) returns.
    """
    check_number("seed", seed, integer=True)
    if max_prompts is not None:
        check_number("max_prompts", max_prompts, low=1, integer=True)
    rows: dict[str, dict] = {}
    for j, row in enumerate(prompt_rows):
        if not isinstance(row, dict) or not {"id", "prompt", "text"} <= set(row):
            raise ParameterError(f"prompt_rows[{j}] must be a dict with keys id, prompt and text")
        if row["id"] in rows:
            raise ParameterError(f"prompt_rows has the id {row['id']!r} twice")
        rows[row["id"]] = row
    groups = _lockstep_groups(configs, pairs, rows)
    out: dict[tuple[int, str], SearchRecord] = {}
    for key in sorted(groups):
        members = groups[key]
        # each group holds configs of one kind (key[0]), so the list below suits the function chosen
        run: Callable[..., Sequence[SearchRecord]] = run_aisp_many if key[0] == "aisp" else run_misvo_many
        decode = None if key[-1] == "None" else key[-1]
        step = max_prompts or len(members)
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            recs = run(sampler, reward, [rows[p]["prompt"] for _, p in chunk], [rows[p]["text"] for _, p in chunk],
                       [configs[i][0] for i, _ in chunk], [prompt_generator(seed, p) for _, p in chunk], decode=decode)
            out.update(zip(chunk, recs))
    return out


def run_pairs(sampler: PrelogitSampler, reward: RewardModel, configs: list[tuple[AISPConfig | MISVOConfig, str | None]],
              rows_by_id: dict[str, dict], pairs: Sequence[tuple[int, str]], seed: int,
              max_prompts: int | None = None) -> dict[tuple[int, str], SearchRecord]:
    """:func:`run_arms` with the pairs shared out across processes under ``accelerate launch``.

    The (distinct) pairs are put in :func:`run_arms`' order (lockstep groups in sorted order), each
    process runs a contiguous share of them and every process gets every record back (:func:`prelogit.shard.run_sharded`); a pair's record does not depend on which
    process ran it, since its generator is keyed by (seed, prompt id). As one plain process this is
    exactly ``run_arms`` on all pairs.

    Args:
        rows_by_id: prompt rows (``id``, ``prompt``, ``text``) by id; must hold every pair's prompt.
        the others: as for :func:`run_arms`.
    Returns:
        ``{(config index, prompt id): record}`` in :func:`run_arms`'s order (lockstep groups in
        sorted order, pairs in the order given), whatever the sharding.
    """
    from .shard import run_sharded

    # checked and ordered before anything runs, so that every process fails alike or none does
    groups = _lockstep_groups(configs, pairs, rows_by_id)
    ordered = [pair for key in sorted(groups) for pair in groups[key]]

    def run(share: list[tuple[int, str]]) -> list[SearchRecord]:
        recs = run_arms(sampler, reward, configs, [rows_by_id[p] for p in dict.fromkeys(p for _, p in share)], share,
                        seed, max_prompts)
        return [recs[pair] for pair in share]

    return dict(zip(ordered, run_sharded(ordered, run)))

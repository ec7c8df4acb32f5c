"""Glue shared by the pipeline notebooks: prompts, the sampler and reward from parameters,
judging, and the reward-vs-samples curves. Kept here so that the notebooks stay readable and
every stage computes the same quantity the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, TypeVar, cast

import torch

from .aisp import AISPConfig, frozen_twin, run_aisp_many
from .engine import prompt_generator, run_best_of_n_many
from .io import read_jsonl
from .metrics import bootstrap_ci, distinct_ngram_diversity, expected_best_of_n, paired_difference
from .models import load_model
from .params import Generation, Model, Reward
from .records import AISPIteration, AISPRecord, BestOfNRecord, CURVE_KEYS, CurveRow, MISVOIteration, SearchRecord
from .rewards import build_judges, build_reward, judge_all, MiniLMEncoder, RewardModel
from .sampling import PrelogitSampler
from .shard import process_device, run_sharded
from .theory import kl_best_of_n

#: A method's record type (a TypedDict of :mod:`prelogit.records`).
R = TypeVar("R")


def load_prompts(path: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Prompt records ({id, split, text, prompt}) of one split, in file order."""
    rows = [r for r in read_jsonl(path) if r["split"] == split]
    if not rows:
        raise ValueError(f"{path} has no prompts in split {split!r}; re-run the prepare stage")
    return rows[:limit] if limit else rows


def set_threads(threads: int) -> int:
    """Use ``threads`` torch CPU threads (0 keeps torch's default); returns the number in use.

    Measured on the project's 2-core machines: one thread generates as fast as two when the
    machine is idle and many times faster when anything else runs, because every small operation
    of token-by-token decoding waits for a thread hand-off.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_sampler(model: Model, generation: Generation) -> tuple[PrelogitSampler, float]:
    """Load the LM of params.yaml's ``model`` section and wrap it in a :class:`PrelogitSampler` that decodes as
    its ``generation`` section says (``model.max_rows`` rows per forward pass); returns (sampler, load seconds).

    Under ``accelerate launch`` a ``cuda`` device becomes this process's own GPU
    (:func:`prelogit.shard.process_device`); ``model.device_map: auto`` spreads the model over every
    visible GPU instead (one process).
    """
    set_threads(model.threads)
    t0 = time.perf_counter()
    lm, tokenizer = load_model(model.name, dtype=model.dtype, device=process_device(model.device),
                               cache_dir=model.cache_dir, device_map=model.device_map)
    sampler = PrelogitSampler(lm, tokenizer, max_new_tokens=generation.max_new_tokens, decode=generation.decode,
                              temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p,
                              max_rows=model.max_rows)
    return sampler, time.perf_counter() - t0


def build_scorers(reward: Reward, reward_head_path: str | Path,
                  device: str = "cpu") -> tuple[RewardModel, dict[str, RewardModel], MiniLMEncoder]:
    """The optimised reward of params.yaml's ``reward`` section (the embedded one reads its trained head from
    ``reward_head_path``) and the held-out judges (which share the MiniLM encoder), on ``device``
    (this process's own GPU under ``accelerate launch``, as for the LM)."""
    device = process_device(device)
    encoder = MiniLMEncoder(device=device)
    if reward.kind == "embedded":
        spec: dict[str, str | None] = {"kind": "embedded", "head": str(reward_head_path)}
    else:
        spec = {"kind": reward.kind, "name": reward.name, "dtype": reward.dtype, "device": device}
    return build_reward(spec, encoder=encoder, device=device), build_judges(encoder), encoder


class StageModels(NamedTuple):
    """A generating stage's sampler and scorers (:func:`build_models`)."""

    sampler: PrelogitSampler
    load_seconds: float
    reward: RewardModel
    judges: dict[str, RewardModel]
    encoder: MiniLMEncoder


def build_models(P: SimpleNamespace) -> StageModels:
    """The sampler and scorers of a generating stage, from what its notebook runs with
    (:func:`prelogit.params.open_notebook`): :func:`build_sampler` of ``P.model`` and
    ``P.generation``, then :func:`build_scorers` of ``P.reward`` with ``P.reward_head_path``, on the
    model's device. ``sampler, load_s, reward, judges, encoder = build_models(P)``."""
    sampler, seconds = build_sampler(P.model, P.generation)
    reward, judges, encoder = build_scorers(P.reward, P.reward_head_path, P.model.device)
    return StageModels(sampler, seconds, reward, judges, encoder)


def prompt_records(rows: list[dict], run: Callable[[list[str], list[str], list[torch.Generator]], list[R]], seed: int,
                   judges: Mapping[str, RewardModel], judged: str) -> list[R]:
    """A search method's records for the prompt ``rows`` (``load_prompts`` rows), with ``prompt_id`` and
    ``prompt`` filled in and the held-out judges' scores.

    ``run(prompts, user_texts, generators)`` runs the method on a list of prompts, each with its own
    generator, seeded by (seed, prompt id) (:func:`prelogit.engine.prompt_generator`), so that a prompt's
    draws do not depend on the other prompts. ``judged`` says what the judges score: ``"samples"``, every
    sample (``rec["judges"]``: judge -> one score per ``rec["responses"]``), or ``"best_so_far"``, each
    iteration's best-so-far answer (``rec["best_so_far_judges"]``: one dict per iteration). Under
    ``accelerate launch`` each process runs its share of the prompts and every process gets all records
    back, in prompt order (:func:`prelogit.shard.run_sharded`).
    """
    if judged not in ("samples", "best_so_far"):
        raise ValueError(f"judged must be 'samples' or 'best_so_far', got {judged!r}")

    def run_share(share: list[dict]) -> list[R]:
        recs = run([p["prompt"] for p in share], [p["text"] for p in share], [prompt_generator(seed, p["id"]) for p in share])
        for p, record in zip(share, recs):
            rec = cast(dict[str, Any], record)  # a TypedDict of the record's kind: these keys are declared there
            rec["prompt_id"], rec["prompt"] = p["id"], p["text"]
            if judged == "samples":
                rec["judges"] = judge_all(judges, [p["text"]] * len(rec["responses"]), rec["responses"])
            else:
                answers = [it["best_so_far"]["response"] for it in rec["iterations"]]
                scores = judge_all(judges, [p["text"]] * len(answers), answers)
                rec["best_so_far_judges"] = [{j: scores[j][k] for j in scores} for k in range(len(answers))]
        return recs

    return run_sharded(rows, run_share)


def best_of_n_records(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel], rows: list[dict], N: int,
                      seed: int, batch_size: int) -> list[BestOfNRecord]:
    """Best-of-N records for the prompt ``rows``: N samples each, every sample scored by the held-out
    judges (:func:`prompt_records`)."""
    return prompt_records(rows, lambda prompts, users, gens: run_best_of_n_many(sampler, reward, prompts, users, N, gens,
                                                                                batch_size), seed, judges, "samples")


def aisp_records(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel], rows: list[dict],
                 config: AISPConfig, seed: int, decode: str | None) -> list[AISPRecord]:
    """AISP records for the prompt ``rows``, all prompts in lockstep (one batched generate and one
    reward call per iteration), decoding given V by ``decode``; the held-out judges score every
    best-so-far answer (:func:`prompt_records`)."""
    return prompt_records(rows, lambda prompts, users, gens: run_aisp_many(sampler, reward, prompts, users, config, gens,
                                                                           decode=decode), seed, judges, "best_so_far")


#: The cost counters averaged per prompt in a summary; the times go to timing.json.
COST_KEYS = ("forward_calls", "new_tokens", "reward_calls", "reward_batches")


def one_response_summary(records: Sequence[Mapping[str, Any]], judges: Iterable[str], seed: int) -> tuple[dict, dict]:
    """``(details, headline)`` of a method that gives one response per prompt, recorded next to the base
    model's greedy response on the same prompt (ARGS, RE-Control), for :func:`prelogit.io.write_stage_metrics`.

    ``details``: the mean reward with its bootstrap CI, the sequence KL to the base model (nats) with its CI,
    each judge's mean, the distinct-n-gram diversity, the deviation rate from greedy, the share of finished
    responses, the greedy reward and the paired difference to it, and the cost per prompt
    (:data:`COST_KEYS`); ``headline``: the few of them ``dvc metrics show`` prints. Every CI resamples
    prompts with ``seed``. The caller adds its configuration and its own fields.
    """
    n = len(records)
    rewards = torch.tensor([r["reward"] for r in records])
    mean, lo, hi = bootstrap_ci(rewards, seed=seed)
    kl_mean, kl_lo, kl_hi = bootstrap_ci(torch.tensor([r["kl_sequence"] for r in records]), seed=seed)
    vs_greedy = paired_difference(rewards, torch.tensor([r["greedy_reward"] for r in records]), seed=seed)
    details = {
        "n_prompts": n, "reward": mean, "reward_ci": [lo, hi], "kl_sequence": {"mean": kl_mean, "lo": kl_lo, "hi": kl_hi},
        "judges": {j: sum(r["judges"][j] for r in records) / n for j in judges},
        "diversity": distinct_ngram_diversity([r["response"] for r in records]),
        "deviation_rate": sum(r["deviation_rate"] for r in records) / n,
        "finished_share": sum(r["finished"] for r in records) / n,
        "greedy_reward": float(torch.tensor([r["greedy_reward"] for r in records]).mean()),
        "vs_greedy": vs_greedy.as_dict(),
        "cost_per_prompt": {key: sum(r["cost"][key] for r in records) / n for key in COST_KEYS},
    }
    headline = {"n_prompts": n, "reward": mean, "reward_lo": lo, "reward_hi": hi, "greedy_reward": details["greedy_reward"],
                "vs_greedy": {"mean": vs_greedy.mean, "lo": vs_greedy.lo, "hi": vs_greedy.hi}, "kl_sequence": {"mean": kl_mean},
                "judges": details["judges"], "deviation_rate": details["deviation_rate"], "diversity": details["diversity"]}
    return details, headline


def one_response_lines(method: str, details: Mapping[str, Any]) -> list[str]:
    """Two lines that read :func:`one_response_summary`'s ``details`` (with ``n_prompts``) for a notebook:
    the reward with its CI, the greedy reward and the paired difference; the judges, diversity,
    deviation rate and the sequence KL to the base model with its CI (nats)."""
    (lo, hi), d, kl = details["reward_ci"], details["vs_greedy"], details["kl_sequence"]
    return [f"{method}: mean reward {details['reward']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {details['n_prompts']} prompts; "
            f"greedy {details['greedy_reward']:+.3f}; {method} - greedy {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]",
            f"judges: { {j: round(v, 3) for j, v in details['judges'].items()} } diversity {details['diversity']:.3f}, "
            f"deviation rate {details['deviation_rate']:.2f}, KL to the base model {kl['mean']:.2f} "
            f"[{kl['lo']:.2f}, {kl['hi']:.2f}] nats"]


def aisp_and_twins(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel],
                   variants: Mapping[str, Mapping[str, Any]],
                   groups: Callable[[Mapping[str, Any]], Sequence[tuple[list[dict], AISPConfig]]],
                   seed: int) -> tuple[list[AISPRecord], list[AISPRecord], dict[str, float]]:
    """Each reading's AISP variant and, on the same prompts and noise, its frozen-U twin (U held at 0):
    AISP - twin is what the adaptation of U adds, twin - best-of-N what the sampler itself does.

    Args:
        variants: ``{reading: {"decode": its decoding given V, ...}}``, e.g. :func:`prelogit.tune.selected_variants`.
        groups: for a variant, its ``(prompt rows, config)`` groups, run one after the other
            (:func:`aisp_records`; an empty group is skipped), then again with each config's twin.
        seed: with each prompt's id, the key of its noise (:func:`prelogit.engine.prompt_generator`).
    Returns:
        ``(records, frozen_records, seconds)``: every record labelled with its ``reading``, in the order of
        ``variants`` and of the groups; ``seconds`` is ``{"aisp": ..., "frozen": ...}`` (wall clock).
    """
    records: list[AISPRecord] = []
    frozen: list[AISPRecord] = []
    seconds = {"aisp": 0.0, "frozen": 0.0}
    for reading, v in variants.items():
        for kind, out, twin in (("aisp", records, False), ("frozen", frozen, True)):
            t0 = time.perf_counter()
            recs = [rec for rows, config in groups(v) if rows
                    for rec in aisp_records(sampler, reward, judges, rows, frozen_twin(config) if twin else config, seed,
                                            v["decode"])]
            seconds[kind] += time.perf_counter() - t0
            for rec in recs:
                rec["reading"] = reading
            out += recs
    return records, frozen, seconds


def bon_curve(records: Sequence[BestOfNRecord], budgets: list[int]) -> list[CurveRow]:
    """Best-of-N at each budget from the same draws, per prompt (unbiased order-statistics estimate).

    For the reward and for each judge, the judge's score of the reward-selected sample. A prompt
    with fewer than N samples has no row at N (the large budgets run on a subset of the prompts).
    The rows' ``kl_bound`` is best-of-N's bound log N - (N - 1) / N (:data:`prelogit.records.CurveRow`).
    """
    rows: list[CurveRow] = []
    for N in budgets:
        for rec in records:
            if len(rec["rewards"]) < N:
                continue
            r = torch.tensor(rec["rewards"])
            row: CurveRow = {"N": N, "prompt_id": rec["prompt_id"], "reward": expected_best_of_n(r, N),
                             "kl_bound": kl_best_of_n(N)}
            for name, vals in rec["judges"].items():
                row[name] = expected_best_of_n(r, N, torch.tensor(vals))
            rows.append(row)
    return rows


def aisp_curve(records: Sequence[SearchRecord]) -> list[CurveRow]:
    """AISP's best-so-far after each iteration, per prompt: budget N = B * n * k.

    Also MISVO's after each step (the misvo stage), N = K * k. A row carries the mean over the
    iteration's chains (AISP) or responses (MISVO) of the one KL its record has: ``kl_control`` for
    AISP records, ``kl_sequence`` for MISVO records (:data:`prelogit.records.CurveRow`).
    """
    rows: list[CurveRow] = []
    for rec in records:
        for it, judged in zip(rec["iterations"], rec["best_so_far_judges"]):
            if "kl_control" in it:
                key, values = "kl_control", cast(AISPIteration, it)["kl_control"]
            else:
                key, values = "kl_sequence", cast(MISVOIteration, it)["kl_sequence"]
            row: CurveRow = {"N": it["samples_so_far"], "prompt_id": rec["prompt_id"],
                             "reward": it["best_so_far"]["reward"], key: float(sum(values) / len(values))}
            row.update(judged)
            rows.append(row)
    return rows


def curve_judges(row: CurveRow) -> list[str]:
    """The judges' names among a curve row's keys: every key but the fixed ones, the KLs and the labels."""
    return [k for k in row if k not in CURVE_KEYS]


def reading_curve(records: Sequence[AISPRecord]) -> list[CurveRow]:
    """:func:`aisp_curve`'s rows of each record, each labelled with the record's ``reading``."""
    return [{**row, "reading": rec["reading"]} for rec in records for row in aisp_curve([rec])]


def mean_by(rows: Sequence[Mapping[str, Any]], key: str, value: str) -> dict[Any, float]:
    """Mean of ``value`` grouped by ``key``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r[value])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def by_iteration(records: Sequence[AISPRecord], ids: set[str] | None = None) -> dict[str, dict[str, float]]:
    """AISP (or frozen-U twin) records per iteration: k (as a string, JSON's key) -> the means over
    the prompts (those in ``ids``, or all) and their chains of

    - ``best_in_iteration``: the best reward of iteration k's n draws (not the best so far);
    - ``mean_reward``: the mean reward of those draws;
    - ``ess``: the effective sample size of the update (of n);
    - ``U_norm``: ||U|| after the update;
    - ``sd_reward_term``, ``sd_lr_term``: the sds over the n draws of the log-weights' reward and
      likelihood-ratio terms (:func:`prelogit.control.log_weight_terms`, U before the update);

    and ``prompts``, how many prompts reached iteration k. Every prompt runs the same chains of n
    draws, so a mean over all draws is also the mean of the per-prompt means.
    """
    its: dict[int, list[AISPIteration]] = {}
    for r in records:
        if ids is None or r["prompt_id"] in ids:
            for it in r["iterations"]:
                its.setdefault(it["k"], []).append(it)

    def mean(xs: Iterable[float]) -> float:
        xs = list(xs)
        return sum(xs) / len(xs)

    return {str(k): {"prompts": len(v), "best_in_iteration": mean(max(max(c) for c in it["rewards"]) for it in v),
                     "mean_reward": mean(x for it in v for c in it["rewards"] for x in c),
                     "ess": mean(e for it in v for e in it["ess"]), "U_norm": mean(u for it in v for u in it["U_norm"]),
                     "sd_reward_term": mean(s for it in v for s in it["sd_reward_term"]),
                     "sd_lr_term": mean(s for it in v for s in it["sd_lr_term"])}
            for k, v in sorted(its.items())}


__all__ = ["load_prompts", "build_sampler", "build_scorers", "StageModels", "build_models", "judge_all", "one_response_summary",
           "one_response_lines",
           "prompt_records", "best_of_n_records",
           "aisp_records", "aisp_and_twins", "bon_curve", "aisp_curve", "reading_curve", "curve_judges", "mean_by",
           "by_iteration", "distinct_ngram_diversity"]

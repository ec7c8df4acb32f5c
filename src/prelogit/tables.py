"""The figures stage's two method tables: every method at every budget (``table.md``) and every
policy on one KL scale (``kl.md``).

Inputs are the stages' records (``samples.jsonl``: one record per prompt, with ``prompt_id``,
``responses``, ``rewards`` and ``lengths``, or ``iterations`` for a sequential search) and curves
(``curve.json`` rows ``{"N", "prompt_id", "reward", <its KL>, <judges>}``, whose KL is ``kl_bound``,
``kl_control`` or ``kl_sequence``: :data:`prelogit.records.CurveRow`). Rewards are in the reward
model's units, KL in nats, costs per prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .metrics import bootstrap_ci, diversity_per_response, kl_bon
from .report import curve_summary

#: How each kind of KL in the method table was measured: best-of-N's is an upper bound
#: (log N - (N - 1) / N), AISP's is in control space (KL(Q_U || P) of its final mean U; the frozen
#: twin's U = 0 gives 0), the others' are sequence-level KLs of the steered policy.
KL_KINDS = ("bound", "control", "sequence")


def best_of_first(record: Mapping, N: int) -> str:
    """The response that the best of a record's first N rewards picks (best-of-N's selection)."""
    return record["responses"][max(range(N), key=record["rewards"][:N].__getitem__)]


def search_answer(record: Mapping, N: int) -> str:
    """The best-so-far answer after N samples of a sequential search (AISP, MISVO)."""
    for it in record["iterations"]:
        if it["samples_so_far"] == N:
            return it["best_so_far"]["response"]
    raise ValueError(f"no iteration of prompt {record.get('prompt_id')!r} ends at N = {N} samples "
                     f"(its iterations end at {[it['samples_so_far'] for it in record['iterations']]})")


def bon_forward_calls(records: Mapping[str, Mapping], N: int, ids: Sequence[str], batch_size: int) -> float:
    """LLM passes of best-of-N per prompt: its samples go in chunks of batch_size, each as long as its longest."""
    return float(np.mean([sum(max(records[i]["lengths"][s:min(s + batch_size, N)]) for s in range(0, N, batch_size))
                          for i in ids]))


def search_forward_calls(records: Mapping[str, Mapping], N: int, ids: Sequence[str]) -> float:
    """A sequential search's iterations (AISP) or steps (MISVO) each cost as many passes as their longest sample."""
    return float(np.mean([sum(max(it["lengths"]) for it in records[i]["iterations"] if it["samples_so_far"] <= N)
                          for i in ids]))


def diversity_of(responses: Iterable[str]) -> float:
    """Mean diversity of the selected responses, one per prompt (:func:`prelogit.metrics.diversity_per_response`)."""
    return float(np.mean(diversity_per_response(list(responses))))


def method_row(method: str, N: int | None, prompts: int, rows: Sequence[Mapping], judges: Sequence[str],
               diversity: float | None, kl_kind: str, forward_calls: float | None, reward_calls: float,
               kl: float | None = None, ci: Mapping | None = None) -> dict:
    """One row of the method table from a curve's rows at budget N (one per prompt).

    The reward's mean and interval and the judges' means are over the rows; ``kl`` is the caller's
    (the rows' mean KL of ``kl_kind`` for best-of-N, AISP and MISVO; None where the curve has no KL).
    """
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}")
    s = curve_summary([dict(r) for r in rows], **(ci or {}))[0]
    return {"method": method, "N": N, "prompts": prompts, "reward": s["mean"], "lo": s["lo"], "hi": s["hi"],
            **{j: float(np.mean([r[j] for r in rows])) for j in judges}, "diversity": diversity, "kl": kl,
            "kl_kind": kl_kind, "forward_calls": forward_calls, "reward_calls": reward_calls}


def _at(curve: Sequence[Mapping], N: int, ids: Sequence[str] | None = None) -> list[Mapping]:
    keep = None if ids is None else set(ids)
    return [r for r in curve if r["N"] == N and (keep is None or r["prompt_id"] in keep)]


def _mean_kl(rows: Sequence[Mapping], kind: str) -> float:
    """The mean over curve rows of their KL of one kind (``kl_bound``, ``kl_control``, ``kl_sequence``)."""
    return float(np.mean([r[f"kl_{kind}"] for r in rows]))


def method_table(*, budgets: Sequence[int], judges: Sequence[str], batch_size: int, ci: Mapping,
                 bon: tuple[Sequence[Mapping], Mapping[str, Mapping]],
                 searches: Sequence[tuple[str, Sequence[Mapping], Mapping[str, Mapping]]],
                 sampler: tuple[str, Sequence[Mapping], Mapping[str, Mapping]] | None = None,
                 misvo: tuple[Sequence[int], Sequence[Mapping], Mapping[str, Mapping]] | None = None,
                 literature: tuple[int, Sequence[float], Sequence[Mapping]] | None = None,
                 baselines: Mapping[str, tuple[Mapping, Sequence[Mapping]]] | None = None) -> list[dict]:
    """Every method at every budget, with its cost: the rows of ``table.md``.

    Args:
        budgets: the budgets N of the first reading (AISP's and best-of-N's); at each, the prompts
            are those of the first search.
        bon: best-of-N's (curve, records by prompt_id).
        searches: (name, curve, records by prompt_id) of AISP and its frozen-U twin, AISP first.
        sampler: the tuned sampler's (name, curve, records by prompt_id), at the budgets it shares.
        misvo: MISVO's (budgets it shares with best-of-N, curve, records by prompt_id).
        literature: (its budget, its lambdas, its curve with ``lit_lam``).
        baselines: name -> (its summary.json, its records), one response per prompt.
    Returns:
        rows {method, N, prompts, reward, lo, hi, <judges>, diversity, kl, kl_kind, forward_calls,
        reward_calls}; KL in nats (``kl_kind`` says which), costs per prompt.
    """
    table = []
    bon_curve, bon_by_id = bon
    for N in budgets:
        ids = [r["prompt_id"] for r in searches[0][1] if r["N"] == N]
        table.append(method_row("best-of-N", N, len(ids), _at(bon_curve, N, ids), judges,
                                diversity_of(best_of_first(bon_by_id[i], N) for i in ids), "bound",
                                bon_forward_calls(bon_by_id, N, ids, batch_size), N, _mean_kl(_at(bon_curve, N, ids), "bound"), ci))
        for name, curve, by_id in searches:
            rows = _at(curve, N, ids)
            table.append(method_row(name, N, len(ids), rows, judges, diversity_of(search_answer(by_id[i], N) for i in ids),
                                    "control", search_forward_calls(by_id, N, ids), N, _mean_kl(rows, "control"), ci))
    if sampler is not None:
        name, curve, by_id = sampler
        for N in sorted({r["N"] for r in curve} & set(budgets)):
            rows = _at(curve, N)
            table.append(method_row(name, N, len(rows), rows, judges,
                                    diversity_of(best_of_first(by_id[r["prompt_id"]], N) for r in rows), "sequence",
                                    None, N, None, ci))
    if misvo is not None:
        Ns, curve, by_id = misvo
        for N in Ns:
            rows = _at(curve, N)
            table.append(method_row("MISVO", N, len(rows), rows, judges,
                                    diversity_of(search_answer(by_id[r["prompt_id"]], N) for r in rows), "sequence",
                                    search_forward_calls(by_id, N, [r["prompt_id"] for r in rows]), N, _mean_kl(rows, "sequence"), ci))
    if literature is not None:
        lit_N, lams, curve = literature
        for lam in lams:
            rows = [r for r in curve if r["lit_lam"] == lam and r["N"] == lit_N]
            table.append(method_row(f"AISP (literature, lambda = {lam})", lit_N, len(rows), rows, judges, None, "control",
                                    None, lit_N, _mean_kl(rows, "control"), ci))
    for name, (m, samples) in (baselines or {}).items():
        mean, lo, hi = bootstrap_ci(torch.tensor([r["reward"] for r in samples]), **ci)
        table.append({"method": name, "N": None, "prompts": len(samples), "reward": mean, "lo": lo, "hi": hi,
                      **m["judges"], "diversity": m["diversity"], "kl": m["kl_sequence"]["mean"], "kl_kind": "sequence",
                      "forward_calls": m["cost_per_prompt"]["forward_calls"],
                      "reward_calls": m["cost_per_prompt"]["reward_calls"]})
    return table


def _or_na(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def kl_cell(row: Mapping) -> str:
    """A method-table row's KL with its kind, e.g. ``"<= 3.17 (bound)"``."""
    if row["kl"] is None:
        return "n/a"
    return {"bound": f"<= {row['kl']:.2f} (bound)", "control": f"{row['kl']:.0f} (control space)",
            "sequence": f"{row['kl']:.2f} (sequence)"}[row["kl_kind"]]


def method_table_markdown(table: Sequence[Mapping], judges: Sequence[str], level: float) -> str:
    """The ``table.md`` table."""
    md = [f"| method | N | prompts | reward (mean, {round(100 * level)}% CI) | " + " | ".join(f"{j} (held out)" for j in judges)
          + " | diversity | KL, nats (kind) | LLM passes / prompt | reward calls / prompt |",
          "|---|---:|---:|---|" + "---:|" * (len(judges) + 4)]
    for r in table:
        md.append(f"| {r['method']} | {r['N'] or '-'} | {r['prompts']} | {r['reward']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] | "
                  + " | ".join(f"{r[j]:+.3f}" for j in judges) + f" | {_or_na(r['diversity'], '.3f')} | {kl_cell(r)} | "
                  f"{_or_na(r['forward_calls'], '.0f')} | {_or_na(r['reward_calls'], '.0f')} |")
    return "\n".join(md)


def point(values: Sequence[float], ci: Mapping) -> tuple[float, float, float] | None:
    """(mean, lo, hi) over prompts in float64, or None for no values."""
    return bootstrap_ci(torch.tensor(values, dtype=torch.float64), **ci) if values else None


def final_policy(samples: Sequence[Mapping], ci: Mapping) -> tuple[tuple | None, tuple | None, int]:
    """(reward, KL, prompts) of the policy steered by a search's final control, one response per prompt."""
    recs = [r for r in samples if r.get("final_rollout")]
    return (point([x for r in recs for x in r["final_rollout"]["rewards"]], ci),
            point([x for r in recs for x in r["final_rollout"]["kl_sequence"]], ci), len(recs))


def kl_table(*, ci: Mapping, bon_samples: Sequence[Mapping], bon_curve: Sequence[Mapping], full_budgets: Sequence[int],
             finals: Sequence[tuple[str, Sequence[Mapping]]],
             baselines: Mapping[str, Sequence[Mapping]] | None = None) -> list[dict]:
    """Every policy on one scale: the reward of its responses against its sequence-level KL to the base model.

    Args:
        bon_samples, bon_curve: best-of-N's records and curve; the base model is one of its samples
            per prompt (the mean over its first max(full_budgets) rewards).
        full_budgets: the budgets every test prompt has; best-of-N's selection at each N >= 2 with
            its upper bound log N - (N - 1) / N.
        finals: (label, records) of the searches whose final control was rolled out (Monte Carlo KL).
        baselines: name -> records of the greedy baselines (exact -log pi_ref(y) per response).
    Returns:
        rows {policy, prompts, reward: (mean, lo, hi), kl: (mean, lo, hi) or (bound, None, None),
        kind}; rewards in the reward model's units, KL in nats.
    """
    top = max(full_budgets)
    base = [float(np.mean(r["rewards"][:min(len(r["rewards"]), top)])) for r in bon_samples]
    table = [{"policy": "base model (one sample)", "prompts": len(bon_samples), "reward": point(base, ci),
              "kl": (0.0, 0.0, 0.0), "kind": "exact"}]
    for N in [n for n in full_budgets if n >= 2]:  # every test prompt, as for the policies below
        rows = [r for r in bon_curve if r["N"] == N]
        table.append({"policy": f"best-of-{N} (selection)", "prompts": len(rows), "reward": point([r["reward"] for r in rows], ci),
                      "kl": (kl_bon(N), None, None), "kind": "upper bound"})
    for label, samples in finals:
        rw, kl, n = final_policy(samples, ci)
        if n:
            table.append({"policy": label, "prompts": n, "reward": rw, "kl": kl, "kind": "Monte Carlo"})
    for name, samples in (baselines or {}).items():
        table.append({"policy": f"{name} (greedy: -log pi_ref(y))", "prompts": len(samples),
                      "reward": point([r["reward"] for r in samples], ci), "kl": point([r["kl_sequence"] for r in samples], ci),
                      "kind": "exact per response"})
    return table


def _fmt_ci(t: tuple | None, digits: int = 2) -> str:
    if t is None:
        return "n/a"
    return f"{t[0]:.{digits}f}" if t[1] is None else f"{t[0]:.{digits}f} [{t[1]:.{digits}f}, {t[2]:.{digits}f}]"


def kl_table_markdown(table: Sequence[Mapping], level: float) -> str:
    """The ``kl.md`` table."""
    pct = round(100 * level)
    md = [(f"| policy | prompts | reward of its responses (mean, {pct}% CI) | KL to the base model, nats (mean, {pct}% CI) "
           "| KL estimate |"), "|---|---:|---|---|---|"]
    for r in table:
        kl_txt = f"<= {r['kl'][0]:.2f}" if r["kind"] == "upper bound" else _fmt_ci(r["kl"])
        md.append(f"| {r['policy']} | {r['prompts']} | {r['reward'][0]:+.2f} [{r['reward'][1]:+.2f}, {r['reward'][2]:+.2f}] | "
                  f"{kl_txt} | {r['kind']} |")
    return "\n".join(md)


def misvo_steps(samples: Sequence[Mapping]) -> list[dict]:
    """MISVO's policy at each step: the mean over prompts of its K samples' mean reward and mean sequence KL (``kl_sequence``, nats)."""
    steps = []
    for k in range(len(samples[0]["iterations"])):
        its = [r["iterations"][k] for r in samples]
        steps.append({"step": k + 1, "reward": float(np.mean([np.mean(it["rewards"]) for it in its])),
                      "kl_sequence": float(np.mean([it["kl_sequence_mean"] for it in its]))})
    return steps

"""Figures, the results table and the README's results block, all computed from ``results/``.

Every number the README quotes is rendered here from results files by
:func:`render_readme_block`; ``tests/test_readme.py`` checks that the README holds exactly that
rendering, so no number in it is typed by hand. ``python -m prelogit.report --update-readme``
refreshes the block after ``dvc repro``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from . import pooling
from .comparisons import BON, MISVO, SAMPLER, Comparison, aisp, per_prompt, twin
from .io import read_json
from .metrics import bootstrap_ci
from .verdict import fmt_interval

START, END = "<!-- results:start -->", "<!-- results:end -->"

#: The README's stage-time table: (row label, stage, key of that stage's ``timing.json``).
STAGE_TIMES: tuple[tuple[str, str, str], ...] = (
    ("prepare", "prepare", "seconds"), ("tune", "tune", "seconds"), ("bon", "bon", "seconds"),
    ("samplers (search)", "samplers", "search_seconds"), ("samplers (test)", "samplers", "test_seconds"),
    ("aisp (both readings)", "aisp", "seconds"), ("aisp (their frozen-U twins)", "aisp", "frozen_seconds"),
    ("aisp (literature and its twins)", "aisp", "lit_seconds"),
    ("aisp (variance)", "aisp", "variance_seconds"), ("misvo (search)", "misvo", "search_seconds"),
    ("misvo (test)", "misvo", "seconds"), ("theory", "theory", "seconds"), ("args", "args", "seconds"),
    ("recontrol (training)", "recontrol", "train_seconds"), ("recontrol (decoding)", "recontrol", "decode_seconds"),
    ("transfer (second distribution)", "transfer", "seconds"),
    ("replicate (other seeds: tune, then test)", "replicate", "seconds"), ("figures", "figures", "seconds"),
)


def stage_times(results: str | Path = "results") -> dict[str, float]:
    """Row label -> seconds, read from each stage's ``timing.json`` (the only files holding timing)."""
    timing = {stage: read_json(Path(results) / stage / "timing.json") for stage in {s for _, s, _ in STAGE_TIMES}}
    return {label: float(timing[stage][key]) for label, stage, key in STAGE_TIMES}


def curve_summary(curve: list[dict], key: str = "reward", n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> list[dict]:
    """Mean over prompts with a bootstrap interval, per budget N: rows {N, mean, lo, hi}."""
    rows = []
    for N in sorted({row["N"] for row in curve}):
        vals = torch.tensor(list(per_prompt(curve, N, key).values()))
        mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, level=level, seed=seed)
        rows.append({"N": N, "mean": mean, "lo": lo, "hi": hi})
    return rows


def plot_curves(ax: Any, summaries: dict[str, list[dict]], ylabel: str) -> None:
    """Mean with a shaded confidence band per method, x on a log2 scale."""
    for name, rows in summaries.items():
        x = [r["N"] for r in rows]
        ax.plot(x, [r["mean"] for r in rows], marker="o", label=name)
        ax.fill_between(x, [r["lo"] for r in rows], [r["hi"] for r in rows], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples N")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}"


def _selection(reading: str, label: str, tune: dict) -> str:
    """A reading's selected arm with its score on the search's prompts and on the held-out ones."""
    val, held = tune["val_minus_bon_by_reading"][reading], tune["holdout_minus_bon_by_reading"][reading]
    text = f"{reading}: `{label}` (minus best-of-N: {fmt_interval(val)} on the {val['n_prompts']} prompts that selected it"
    if held:
        text += f", {fmt_interval(held)} on {held['n_prompts']} held-out validation prompts"
    return text + ")"


def _stability(reading: str, f: dict) -> str:
    """One reading's selection frequency (:func:`prelogit.selection.selection_frequency`) as a sentence."""
    if f["frequency"] is None:
        return f"{reading}: one arm from the first rung on"
    d = f["selected_minus_runner_up"]
    rungs = ", ".join(f"rung {r['rung']} ({r['kept']} of {r['alive']} kept on {r['prompts']} prompts) {r['share']:.0%}"
                      for r in f["survival"])
    return (f"{reading}: `{f['selected']}` is re-selected on {f['frequency'][f['selected']]:.0%} of the resamples of its "
            f"{f['prompts']} deciding prompts (runner-up `{f['runner_up']}` {f['frequency'][f['runner_up']]:.0%}; selected "
            f"minus runner-up {fmt_interval(d)}, {d['decision']}); it stays among the arms kept in {rungs}")


def _across_seeds(rep: dict, readings: list[str], N: int) -> str:
    """The replication paragraph: each reading's arm per seed and its pooled headline contrasts."""
    parts = []
    for r in readings:
        sel = rep["selection"][r]
        arms = ", ".join(f"seed {s} `{label}`" for s, label in sel["by_seed"].items())
        text = (f"**{r} reading: what wins over the seeds is {rep['what_wins'][r]}**; selected {arms} "
                f"({sel['distinct']} distinct arm(s) in {sel['seeds']} seeds)")
        for what, first, second in (("best-of-N", aisp(r), BON), ("its frozen-U twin", aisp(r), twin(r)),
                                    ("the tuned sampler", aisp(r), SAMPLER)):
            row = pooling.find(rep["rows"], Comparison(first, second), N)
            if row:
                per = ", ".join(_fmt(c["mean"]) for c in row["per_seed"].values())
                text += (f"; AISP minus {what} pooled {fmt_interval(row['pooled'])} (per seed {per}; "
                         f"AISP > {what}: **{row['grade']}**)")
        parts.append(text)
    return (f"**Across seeds** (the whole procedure, tune then test, with seeds {', '.join(map(str, rep['seeds']))}; the main "
            f"run is seed {rep['main_seed']}; at N = {N} on the {rep['test_prompts']} test prompts every seed ran; the "
            f"tuned sampler `{rep['sampler']}` is the samplers stage's selection, drawn anew per seed): "
            + "; ".join(parts) + ".")


def render_readme_block(results: str | Path = "results") -> str:
    """The README's results section, rendered from the committed results files.

    The verdict, claims and results tables are the figures stage's markdown files, verbatim.
    """
    results = Path(results)
    figs = results / "figures"
    fig = read_json(figs / "summary.json")
    lines = [START, "", "<!-- generated by `python -m prelogit.report --update-readme`; do not edit by hand -->", ""]
    cfg, tune = fig["aisp_config"], fig["tune"]
    reading = fig["reading"]
    large = (f" (the first {fig['large_prompts']} also to N = {max(fig['budgets'])})"
             if fig["large_prompts"] and fig["large_prompts"] < fig["n_prompts"] else "")
    lines.append(f"Embedded default: {fig['n_prompts']} test prompts{large}, budgets up to N = {max(fig['budgets'])}, "
                 f"{fig['max_new_tokens']} new tokens, reward = MiniLM sentiment-head logit "
                 f"(held-out accuracy of the head: {fig['reward_head_accuracy']:.3f}). The decoding given V defines the "
                 f"sampler, so each reading ({', '.join(fig['readings'])}) is its own AISP variant, tuned by its own "
                 f"successive halving on {tune['n_prompts']} validation prompts ({tune['n_arms']} arms in all, "
                 f"{tune['evaluations']} arm-prompt runs) and run on the test prompts with its frozen-U twin: "
                 + "; ".join(_selection(r, label, tune) for r, label in tune["selected_by_reading"].items())
                 + f". Detailed below (search, claims, figures): the {reading} reading, sigma = {cfg['sigma']:.2f} "
                 f"({tune['selected_arm']['sigma_rms']} x the pre-logit RMS {tune['rms']:.2f}), lambda = {cfg['lam']} "
                 f"({cfg['lam_mode']}), alpha = {cfg['alpha']} ({cfg['alpha_mode']}), tau = {cfg['tau']}, "
                 f"n = {cfg['n']} per iteration.")
    sel = tune.get("selection_by_reading")
    if sel:
        lines += ["", "**How firmly each arm was selected** (the prompts of its deciding rung, the last with two or more "
                  "arms, resampled and the same rule re-applied; the seeds and the CPU's rounding, which act like seeds, are "
                  "not resampled): " + "; ".join(_stability(r, f) for r, f in sel.items()) + "."]
    rep = fig.get("replication")
    if rep:
        lines += ["", _across_seeds(rep, fig["readings"], fig["verdict_N"])]
    ms = fig.get("misvo")
    if ms:
        mc, mv = ms["config"], ms["val_minus_bon"]
        lines.append("")
        lines.append(f"MISVO (Entesari et al. 2026) runs beside it on the first {ms['n_prompts']} test prompts at the same "
                     f"budget: successive halving over {ms['n_arms']} arms ({ms['evaluations']} arm-prompt runs) on "
                     f"{ms['val_prompts']} validation prompts selected `{ms['selected']}`, i.e. eta = {mc['eta']}, "
                     f"lambda = {mc['lam']}, K = {mc['K']} samples per step for {mc['steps']} steps, Fisher: {mc['fisher']} "
                     f"(validation: MISVO - best-of-{mc['K'] * mc['steps']} {fmt_interval(mv)}).")
    ww = fig["what_wins"]
    one = []
    for r in fig["readings"]:
        head = next(c for c in fig["claims"] if c["claim"] == f"AISP > best-of-N at equal N ({r} reading)")
        w = ww["by_reading"][r]
        bo, ad, sa, vt = w["vs_bon"], w["adaptation"], w["sampler"], w["vs_tuned_sampler"]
        text = (f"**{r} reading: what wins is {w['verdict']}.** AISP minus best-of-N {fmt_interval(bo)} ({bo['decision']}: "
                f"the paper's claim is **{head['verdict']}**); AISP minus its frozen-U twin (the same sampler and noise, U "
                f"held at 0) {fmt_interval(ad)} ({ad['decision']}); the twin minus best-of-N {fmt_interval(sa)} ({sa['decision']})")
        if vt:
            text += (f"; AISP minus the best non-adaptive sampler tuned on the same validation prompts "
                     f"(`{ww['tuned_sampler']}`) {fmt_interval(vt)} ({vt['decision']})")
        qa = ww.get("questions")
        if qa:
            q = qa["by_reading"][r]
            text += (f". On {qa['n_prompts']} ChatterBot questions (a second prompt distribution, run with the configuration "
                     f"tuned on chit-chat): what wins is {q['verdict']}; AISP minus best-of-N {fmt_interval(q['vs_bon'])} "
                     f"({q['vs_bon']['decision']}), minus its twin {fmt_interval(q['adaptation'])} "
                     f"({q['adaptation']['decision']}), the twin minus best-of-N {fmt_interval(q['sampler'])}")
        one.append(text + ".")
    main = ww["by_reading"][reading]["vs_bon"]
    lines += ["", f"**In one line,** at N = {main['N']} on {main['n_prompts']} test prompts: " + " ".join(one)
              + " The evidence for why is below the tables and in `notebooks/figures.ipynb`."]
    # summary.json's rows carry display labels: look them up through the keys' labels, never typed-in text
    vm = next((v for v in fig["verdict"] if v["comparison"] == Comparison(MISVO, BON).label and v["N"] == main["N"]), None)
    am = next((v for v in fig["verdict"] if v["comparison"] == Comparison(aisp(reading), MISVO).label), None)
    if vm and am:
        lines[-1] += (f" MISVO minus best-of-N at the same N: {fmt_interval(vm)} ({vm['decision']}); AISP ({reading}) "
                      f"minus MISVO at N = {am['N']}: {fmt_interval(am)} ({am['decision']}).")
    lines += ["", f"**Verdict** (paired bootstrap over prompts, {fig['ci_level']:.0%} intervals; the rule is stated in "
              "`notebooks/figures.ipynb`):", ""]
    lines += (figs / "verdict.md").read_text().rstrip("\n").splitlines()
    if rep:
        lines += ["", f"**Across seeds** (seeds {', '.join(map(str, rep['seeds']))}, each tuned and tested anew; per seed the "
                  f"mean difference on the {rep['test_prompts']} test prompts every seed ran, then the pooled interval and "
                  "the grade by the rule stated in `notebooks/figures.ipynb`):", ""]
        lines += (figs / "replication.md").read_text().rstrip("\n").splitlines()
    lines += ["", "**The paper's claims on the embedded default:**", ""]
    lines += (figs / "claims.md").read_text().rstrip("\n").splitlines()
    lines += ["", "**Results table:**", ""]
    lines += (figs / "table.md").read_text().rstrip("\n").splitlines()
    kl_md = figs / "kl.md"
    if kl_md.exists():
        lines += ["", "**One KL for every method** (sequence-level KL(pi || pi_ref) to the base model of the policy that "
                  "produced the responses, beside best-of-N's analytic bound; how each is estimated is in "
                  "`notebooks/figures.ipynb`):", ""]
        lines += kl_md.read_text().rstrip("\n").splitlines()
    why = fig["why"]
    lines.append("")
    lines.append(f"- Base model: mean reward {_fmt(fig['base_reward_mean'])}, within-prompt std {fig['base_reward_std']:.2f}.")
    lines.append(f"- Tuned AISP ({reading} reading): mean effective sample size {why['ess_mean']:.2f} of n = {why['n']}; control-space "
                 f"KL(Q_U||P) of the final mean {why['kl_control_final']:.0f} nats; sigma / pre-logit RMS = {why['sigma_over_rms']:.2f}"
                 + (f"; the control V explains {why['variance_share_V']:.0%} of the reward's variance at U = 0, token "
                    "sampling the rest" if why["variance_share_V"] is not None else "") + ".")
    if why.get("final_rollout_reward") is not None:
        lines.append(f"- A response generated from AISP's final mean U scores {_fmt(why['final_rollout_reward'])} on "
                     f"average, an unsteered base-model sample {_fmt(why['base_reward_mean'])}.")
    seq = why.get("sequence_kl") or {}
    if seq.get("aisp") and seq.get("misvo"):
        a, m = seq["aisp"], seq["misvo"]
        lines.append(f"- The policy steered by AISP's final mean U is {a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] nats "
                     f"from the base model (sequence level), MISVO's final u {m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}] "
                     f"nats; a response from MISVO's final u scores {_fmt(why['misvo_final_rollout_reward']['mean'])}.")
    th = fig["theory"]
    lines.append(f"- Theory: {th['n_checks'] - th['n_failed']} of {th['n_checks']} closed-form checks pass. Pre-logits: "
                 f"{th['gauss_share_pass']:.0%} of dimensions pass a per-dimension normality test at level {th['gauss_level']} "
                 f"({th['gauss_share_pass_bonferroni']:.0%} after Bonferroni), mean excess kurtosis "
                 f"{th['gauss_mean_excess_kurtosis']:.2f}; importance sampling's ESS halves at D = {th['ess_dim_at_half']:.0f}.")
    lines.append("")
    lines.append("Measured stage times (seconds, from the stages' `timing.json` files, each from the stage's last run on "
                 "the machine it ran on; model loading and notebook start-up not included):")
    lines.append("")
    lines.append("| stage | seconds |")
    lines.append("|---|---:|")
    times = stage_times(results)
    for stage, sec in times.items():
        lines.append(f"| {stage} | {sec:.0f} |")
    lines.append(f"| total | {sum(times.values()):.0f} |")
    bench = results / "benchmarks" / "sampling.json"
    if bench.exists():
        lines += [""] + benchmark_lines(read_json(bench))
    dtype_bench = results / "benchmarks" / "dtype.json"
    if dtype_bench.exists():
        lines += [""] + dtype_lines(read_json(dtype_bench))
    lines += ["", END]
    return "\n".join(lines)


def benchmark_lines(b: dict) -> list[str]:
    """The sampling benchmark's ratios (``benchmarks/sampling.py``), each beside its target."""
    t = b["targets"]
    ok = lambda value, target, higher: "met" if (value >= target if higher else value <= target) else "**not met**"  # noqa: E731
    lines = [f"Sampling benchmark (`benchmarks/sampling.py`, one run: {b['prompts']} prompts, {b['tokens']} new tokens, "
             f"{b['dtype']}, {b['torch_threads']} thread(s), {b['max_rows']} rows per forward pass; fp32 GEMM peak "
             f"{b['gemm_peak_gflops']:.0f} GFLOP/s):", "",
             "| figure | measured | target | |", "|---|---:|---:|---|"]
    a = b["batched_over_one_prompt_tokens_per_s"]
    lines.append(f"| (a) batched over one-prompt tokens/s, best-of-32 | {a:.2f} | >= {t['batched_over_one_prompt_tokens_per_s']} | "
                 f"{ok(a, t['batched_over_one_prompt_tokens_per_s'], True)} |")
    for N, r in b["aisp_over_bon_wall_clock"].items():
        lines.append(f"| (b) AISP over best-of-N wall clock, N = {N} | {r:.2f} | <= {t['aisp_over_bon_wall_clock']} | "
                     f"{ok(r, t['aisp_over_bon_wall_clock'], False)} |")
    for N, shares in b["share_of_gemm_peak"].items():
        for method, v in shares.items():
            lines.append(f"| (c) share of GEMM peak, {'AISP' if method == 'aisp' else 'best-of-N'}, N = {N} | {v:.0%} | "
                         f">= {t['share_of_gemm_peak']:.0%} | {ok(v, t['share_of_gemm_peak'], True)} |")
    d = b["batched_bon_over_generate"]
    lines.append(f"| (d) batched best-of-8 over `generate` prompt by prompt | {d:.2f}x | >= {t['batched_bon_over_generate']}x | "
                 f"{ok(d, t['batched_bon_over_generate'], True)} |")
    if "threads_study" in b:
        lines.append("")
        lines.append("Batched best-of-32 throughput by torch threads: " + "; ".join(
            f"{k.replace('_tokens_per_s', '').replace('_', ' ')}: {v:.0f} tok/s" for k, v in b["threads_study"].items()) + ".")
    return lines


def dtype_lines(b: dict) -> list[str]:
    """bfloat16 against float32 (``benchmarks/dtype.py``): the ratios that decide ``model.dtype``."""
    units = "AMX and AVX512-BF16" if b["amx_bf16"] else ("AVX512-BF16, no AMX" if b["avx512_bf16"] else "no bfloat16 units")
    nb = b["no_bf16_units"]
    return [f"bfloat16 against float32 (`benchmarks/dtype.py`, one run, {b['torch_threads']} threads, this CPU: {units}):", "",
            "| figure | bfloat16 / float32 |", "|---|---:|",
            f"| best-of-32 tokens/s, 16 prompts, 16 tokens | {b['bf16_over_fp32_tokens_per_s']:.2f}x |",
            f"| the same, LM head kept in float32 | {b['bf16_head_fp32_over_fp32_tokens_per_s']:.2f}x |",
            f"| the same, oneDNN limited to `{nb['isa']}` (a CPU without bfloat16 units) | {nb['bf16_over_fp32_tokens_per_s']:.2f}x |",
            f"| best-of-64 plus AISP (N = 64), 16 prompts, reward included: wall-clock speed-up | "
            f"{b['bf16_over_fp32_stage_wall_clock']:.2f}x |",
            f"| greedy tokens that agree, {b['greedy_prompts']} test prompts (identical responses: "
            f"{b['greedy_identical_responses']:.0%}) | {b['greedy_token_agreement']:.0%} |"]


def update_readme(readme: str | Path = "README.md", results: str | Path = "results") -> bool:
    """Replace the README's results block; return True if it changed."""
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {START} ... {END} block")
    new = pattern.sub(lambda _: render_readme_block(results), text)
    if new != text:
        readme.write_text(new)
    return new != text


def readme_block(readme: str | Path = "README.md") -> str:
    text = Path(readme).read_text()
    m = re.search(re.escape(START) + ".*?" + re.escape(END), text, re.S)
    return m.group(0) if m else ""


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Render the README's results block from results/")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    if args.update_readme:
        print("README updated" if update_readme() else "README already up to date")
    else:
        print(render_readme_block())
    sys.exit(0)

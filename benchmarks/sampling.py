"""Sampling benchmark of the batched engine: ratios measured in one run (the machines are shared and noisy).

On the embedded default (SmolLM2-135M-Instruct, float32), 16 prompts, 24 new tokens, EOS disabled
so that both sides of every ratio generate exactly the same number of tokens:

(a) ``batched_over_one_prompt_tokens_per_s``: tokens/s of best-of-32 over 16 prompts in one
    batched call, over the one-prompt path (one ``generate(prompt, 32)`` per prompt). Target >= 1.3.
(b) ``aisp_over_bon_wall_clock``: wall-clock of AISP (n = 8, K = 4) over best-of-32 on the same
    prompts, both batched across prompts and scored by the real reward, and the same at N = 128
    (n = 32, K = 4). Target <= 1.15.
(c) ``share_of_gemm_peak``: decode throughput of each method as a share of this process's fp32
    GEMM peak (a large matmul, measured before and after; the higher is used). FLOPs count as
    2 x parameters per token. Target >= 0.55.
(d) ``batched_bon_over_generate``: speed-up of batched best-of-8 over
    ``model.generate(num_return_sequences=8)`` run prompt by prompt. Target >= 1.5.

``--threads-study`` also times batched best-of-32 generation with 1 and 2 torch threads, on an
idle machine and beside a competing busy process, to choose ``model.threads``.

    python benchmarks/sampling.py [--threads 1] [--threads-study] [--out results/benchmarks/sampling.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
from dataclasses import replace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prelogit.aisp import AISPConfig, run_aisp_many  # noqa: E402
from prelogit.engine import prompt_generator, run_best_of_n_many  # noqa: E402
from prelogit.io import write_json  # noqa: E402
from prelogit.params import Generation, Model, Reward  # noqa: E402
from prelogit.runs import build_sampler, build_scorers, load_prompts  # noqa: E402

TARGETS = {"batched_over_one_prompt_tokens_per_s": 1.3, "aisp_over_bon_wall_clock": 1.15, "share_of_gemm_peak": 0.55,
           "batched_bon_over_generate": 1.5}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gemm_peak(size: int = 1536, repeats: int = 8) -> float:
    """fp32 GFLOP/s of a large square matmul in this process (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-dir", default="models")
    ap.add_argument("--prompts", default="results/prepare/prompts.jsonl")
    ap.add_argument("--reward-head", default="results/prepare/reward_head.safetensors")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--max-rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-n128", action="store_true", help="skip the N = 128 comparison (the slowest part)")
    ap.add_argument("--threads-study", action="store_true")
    ap.add_argument("--out", default="results/benchmarks/sampling.json")
    args = ap.parse_args()

    sampler, _ = build_sampler(Model(name=args.model, dtype=args.dtype, device="cpu", cache_dir=args.cache_dir,
                                     threads=args.threads, max_rows=args.max_rows, device_map=None),
                               Generation(max_new_tokens=args.tokens, decode="sample", temperature=1.0, top_k=0, top_p=1.0))
    sampler.eos_ids = torch.tensor([], dtype=torch.long)  # every row generates exactly T tokens
    model = sampler.model
    reward, _, _ = build_scorers(Reward(kind="embedded", name=None, dtype="float32"), args.reward_head)
    rows = load_prompts(args.prompts, "train", args.n_prompts)
    if len(rows) < args.n_prompts:
        raise SystemExit(f"{args.prompts} has only {len(rows)} train prompts; run the prepare stage or lower --n-prompts")
    prompts, users = [r["prompt"] for r in rows], [r["text"] for r in rows]
    gens = lambda: [prompt_generator(0, r["id"]) for r in rows]  # noqa: E731
    T, P = args.tokens, len(rows)
    params = sum(p.numel() for p in model.parameters())
    peak = gemm_peak()
    print(f"fp32 GEMM peak {peak:.1f} GFLOP/s with {torch.get_num_threads()} thread(s); {params / 1e6:.1f}M parameters")

    sampler.generate_many(prompts[:2], [4, 4], generators=gens()[:2])  # warm-up
    # (a) batched best-of-32 over the one-prompt path, generation only
    one_s, _ = timed(lambda: [sampler.generate(p, 32, generator=g) for p, g in zip(prompts, gens())])
    many_s, _ = timed(lambda: sampler.generate_many(prompts, [32] * P, generators=gens()))
    tokens_32 = P * 32 * T
    a = {"one_prompt_tokens_per_s": tokens_32 / one_s, "batched_tokens_per_s": tokens_32 / many_s,
         "ratio": one_s / many_s}
    print(f"(a) best-of-32 tokens/s: one prompt at a time {a['one_prompt_tokens_per_s']:.0f}, batched "
          f"{a['batched_tokens_per_s']:.0f}: {a['ratio']:.2f}x (target >= 1.3)")

    # (b), (c) AISP against best-of-N at equal N, both batched across prompts, reward included
    b, c = {}, {}
    cfg = AISPConfig(sigma=0.5, lam=0.1, n=8, K=4, tau=8, final_rollout=False)
    for N, n in [(32, 8)] + ([] if args.no_n128 else [(128, 32)]):
        bon_s, bon = timed(lambda N=N: run_best_of_n_many(sampler, reward, prompts, users, N, gens()))
        aisp_s, aisp = timed(lambda n=n: run_aisp_many(sampler, reward, prompts, users, replace(cfg, n=n), gens()))
        b[str(N)] = {"bon_seconds": bon_s, "aisp_seconds": aisp_s, "ratio": aisp_s / bon_s}
        # decode throughput (generation time only); its share of the peak is taken at the end
        c[str(N)] = {name: sum(r["cost"]["new_tokens"] for r in recs) / sum(r["cost"]["time_generation_s"] for r in recs)
                     for name, recs in (("bon", bon), ("aisp", aisp))}
        print(f"(b) N = {N}: AISP {aisp_s:.1f} s, best-of-N {bon_s:.1f} s: {aisp_s / bon_s:.2f}x (target <= 1.15); "
              f"decode tok/s: best-of-N {c[str(N)]['bon']:.0f}, AISP {c[str(N)]['aisp']:.0f}")

    # (d) batched best-of-8 against generate(num_return_sequences=8) prompt by prompt
    def hf_generate():
        for p in prompts:
            ids = sampler.encode(p)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                               temperature=1.0, max_new_tokens=T, min_new_tokens=T, num_return_sequences=8)

    hf_s, _ = timed(hf_generate)
    ours_s, _ = timed(lambda: sampler.generate_many(prompts, [8] * P, generators=gens()))
    d = {"generate_seconds": hf_s, "batched_seconds": ours_s, "speedup": hf_s / ours_s}
    print(f"(d) best-of-8: generate prompt by prompt {hf_s:.1f} s, batched {ours_s:.1f} s: {d['speedup']:.2f}x "
          "(target >= 1.5)")
    peak = max(peak, gemm_peak())
    share = {N: {name: tok_s * 2 * params / (peak * 1e9) for name, tok_s in v.items()} for N, v in c.items()}
    for N, v in share.items():
        print(f"(c) N = {N}: share of GEMM peak ({peak:.0f} GFLOP/s): best-of-N {v['bon']:.0%}, AISP {v['aisp']:.0%} "
              "(target >= 55%)")

    results = {
        "model": args.model, "dtype": args.dtype, "tokens": T, "prompts": P, "max_rows": args.max_rows,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "gemm_peak_gflops": peak, "parameters": params,
        "batched_over_one_prompt_tokens_per_s": a["ratio"],
        "aisp_over_bon_wall_clock": {N: v["ratio"] for N, v in b.items()},
        "share_of_gemm_peak": share,
        "batched_bon_over_generate": d["speedup"],
        "details": {"a": a, "b": b, "decode_tokens_per_s": c, "d": d}, "targets": TARGETS,
    }
    if args.threads_study:
        study = {}
        for busy in (False, True):
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,)) if busy else None
            if spinner:
                spinner.start()
            try:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    secs, _ = timed(lambda: sampler.generate_many(prompts, [32] * P, generators=gens()))
                    study[f"{'busy' if busy else 'idle'}_{threads}_threads_tokens_per_s"] = tokens_32 / secs
                    print(f"threads study: {threads} thread(s), {'beside a busy process' if busy else 'idle'}: "
                          f"{tokens_32 / secs:.0f} tok/s")
            finally:
                if spinner:
                    stop.set()
                    spinner.join()
        torch.set_num_threads(args.threads)
        results["threads_study"] = study
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Sampling benchmark: ratios measured in one run (the machines are shared and noisy).

1. AISP vs best-of-N per generated token at the same batch size n: the same sampler, once with a
   control input on every generated token (tau = T) plus the importance-sampling update of U, once
   without control. Target: ratio <= 1.10.
2. Best-of-N with the shared prefill vs ``model.generate(num_return_sequences=n)`` for the same n
   and the same number of tokens. Target: ratio <= 1.00.

Both sides generate exactly n x T tokens (EOS is disabled), and the measurements are interleaved
and repeated, so drifts in machine load hit both sides alike; medians are reported.

    python benchmarks/sampling.py [--n 8 16] [--tokens 24] [--repeats 5] [--out results/benchmarks/sampling.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prelogit.control import importance_weights, update_mean  # noqa: E402
from prelogit.io import write_json  # noqa: E402
from prelogit.models import load_model  # noqa: E402
from prelogit.sampling import PrelogitSampler  # noqa: E402

PROMPT = "Hi! I just got back from a long trip. How has your week been?"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-dir", default="models")
    ap.add_argument("--n", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see prelogit.runs.set_threads)")
    ap.add_argument("--out", default="results/benchmarks/sampling.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    sampler = PrelogitSampler(model, tok, max_new_tokens=args.tokens)
    sampler.eos_ids = torch.tensor([], dtype=torch.long)  # every row generates exactly T tokens
    ids = sampler.encode(PROMPT, chat=True)
    mask = torch.ones_like(ids)
    T, d = args.tokens, sampler.d
    results = {"model": args.model, "dtype": args.dtype, "tokens": T, "repeats": args.repeats,
               "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "by_n": {}}
    for n in args.n:
        gen = torch.Generator().manual_seed(0)
        U = torch.zeros(T, d)

        def bon():
            sampler.generate(ids, n, generator=gen)

        def aisp():
            V = U + args.sigma * torch.randn(n, T, d, generator=gen)
            sampler.generate(ids, n, control=V, generator=gen)
            w = importance_weights(torch.randn(n, generator=gen), V, U, args.sigma, 0.1)
            update_mean(U, V, w)

        def hf_generate():
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                               max_new_tokens=T, min_new_tokens=T, num_return_sequences=n)

        for fn in (bon, aisp, hf_generate):  # warm-up
            fn()
        times = {"bon": [], "aisp": [], "generate": []}
        for _ in range(args.repeats):
            times["bon"].append(timed(bon))
            times["aisp"].append(timed(aisp))
            times["generate"].append(timed(hf_generate))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"median_seconds": med, "seconds_per_token": {k: v / (n * T) for k, v in med.items()},
               "aisp_over_bon_per_token": med["aisp"] / med["bon"],
               "bon_over_generate": med["bon"] / med["generate"],
               "targets": {"aisp_over_bon_per_token": 1.10, "bon_over_generate": 1.00}}
        results["by_n"][str(n)] = row
        print(f"n = {n:3d}: AISP / BoN per token = {row['aisp_over_bon_per_token']:.3f} (target <= 1.10); "
              f"BoN (shared prefill) / generate(num_return_sequences) = {row['bon_over_generate']:.3f} (target <= 1.00)")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

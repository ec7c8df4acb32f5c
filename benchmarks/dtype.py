"""bfloat16 against float32 on this CPU: ratios measured in one run (the machines are shared and noisy).

Every figure is a ratio of two timings taken in this one invocation, each in a fresh worker process
(oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, at start-up), on the embedded default, 2 torch threads:

- ``bf16_over_fp32_tokens_per_s``: generation throughput of best-of-32 over 16 test prompts, 16 new
  tokens (EOS disabled, so both sides generate the same tokens), bfloat16 over float32;
- ``bf16_head_fp32_over_fp32_tokens_per_s``: the same with the LM head kept in float32 (the
  variant that was measured and not adopted: see the README);
- ``no_bf16_units``: both ratios with oneDNN limited to ``AVX512_CORE`` (no bfloat16 instructions),
  what a CPU without bfloat16 units can expect;
- ``bf16_over_fp32_stage_wall_clock``: best-of-64 plus AISP (n = 16, K = 4) on 16 test prompts,
  reward included, float32 wall-clock over bfloat16;
- ``greedy_token_agreement``: share of the greedy tokens of 32 test prompts (unperturbed, 16 tokens)
  that bfloat16 and float32 agree on, position by position, and the share of prompts whose greedy
  responses are identical.

    python benchmarks/dtype.py [--out results/benchmarks/dtype.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2


def _worker(dtype: str, head_fp32: bool, what: str, prompts_path: str, head_path: str) -> dict:
    """Run one measurement in this process; returns its timings (and greedy tokens)."""
    import torch

    from prelogit.aisp import AISPConfig, run_aisp_many
    from prelogit.engine import prompt_generator, run_best_of_n_many
    from prelogit.params import Generation, Model, Reward
    from prelogit.runs import build_sampler, build_scorers, load_prompts
    from prelogit.sampling import DEFAULT_MAX_ROWS

    sampler, _ = build_sampler(Model(name="embedded", dtype=dtype, device="cpu", cache_dir="models", threads=THREADS,
                                     max_rows=DEFAULT_MAX_ROWS, device_map=None),
                               Generation(max_new_tokens=16, decode="sample", temperature=1.0, top_k=0, top_p=1.0))
    if head_fp32:
        # a float32 copy of the (tied) head, fed float32 pre-logits: logits are not rounded to bfloat16
        head = sampler.model.lm_head
        copy = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        copy.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
        copy.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        sampler.model.lm_head = sampler.head = copy  # the sampler hooks self.head on every call
    n_prompts = {"tokens": 16, "stage": 16, "greedy": 32}[what]
    rows = load_prompts(prompts_path, "test", n_prompts)
    prompts, users = [r["prompt"] for r in rows], [r["text"] for r in rows]
    gens = lambda: [prompt_generator(0, r["id"]) for r in rows]  # noqa: E731
    sampler.generate_many(prompts[:2], [4, 4], generators=gens()[:2])  # warm-up
    if what == "tokens":
        sampler.eos_ids = torch.tensor([], dtype=torch.long)
        t0 = time.perf_counter()
        sampler.generate_many(prompts, [32] * len(prompts), generators=gens())
        return {"seconds": time.perf_counter() - t0, "tokens": 32 * 16 * len(prompts)}
    if what == "greedy":
        out = sampler.generate_many(prompts, [1] * len(prompts), decode="greedy")
        return {"tokens": [g.tokens[0, : int(g.lengths[0])].tolist() for g in out]}
    reward, _, _ = build_scorers(Reward(kind="embedded", name=None, dtype="float32"), head_path)
    t0 = time.perf_counter()
    run_best_of_n_many(sampler, reward, prompts, users, 64, gens())
    run_aisp_many(sampler, reward, prompts, users, AISPConfig(sigma=0.5, lam=0.1, n=16, K=4, tau=8,
                                                              final_rollout=False), gens())
    return {"seconds": time.perf_counter() - t0}


def _run(dtype: str, what: str, args, head_fp32: bool = False, isa: str | None = None) -> dict:
    env = dict(os.environ)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, __file__, "--worker", dtype, str(int(head_fp32)), what, "--prompts", args.prompts,
           "--reward-head", args.reward_head]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="results/prepare/prompts.jsonl")
    ap.add_argument("--reward-head", default="results/prepare/reward_head.safetensors")
    ap.add_argument("--out", default="results/benchmarks/dtype.json")
    ap.add_argument("--worker", nargs=3, metavar=("DTYPE", "HEAD_FP32", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        dtype, head, what = args.worker
        print(json.dumps(_worker(dtype, head == "1", what, args.prompts, args.reward_head)))
        return
    if not os.path.exists(args.prompts):
        raise SystemExit(f"{args.prompts} is missing; run the prepare stage first (dvc repro prepare)")

    from prelogit.io import write_json

    def tok_s(**kw) -> float:
        r = _run(what="tokens", args=args, **kw)
        return r["tokens"] / r["seconds"]

    # interleaved, so that a slow spell of the shared machine falls on both sides of a ratio
    fp32, bf16, bf16_head = tok_s(dtype="float32"), tok_s(dtype="bfloat16"), tok_s(dtype="bfloat16", head_fp32=True)
    print(f"best-of-32 tok/s: float32 {fp32:.0f}, bfloat16 {bf16:.0f} ({bf16 / fp32:.2f}x), "
          f"bfloat16 with a float32 head {bf16_head:.0f} ({bf16_head / fp32:.2f}x)", flush=True)
    isa = "AVX512_CORE"
    fp32_n, bf16_n = tok_s(dtype="float32", isa=isa), tok_s(dtype="bfloat16", isa=isa)
    print(f"ONEDNN_MAX_CPU_ISA={isa}: float32 {fp32_n:.0f}, bfloat16 {bf16_n:.0f} ({bf16_n / fp32_n:.2f}x)", flush=True)
    stage_fp32 = _run("float32", "stage", args)["seconds"]
    stage_bf16 = _run("bfloat16", "stage", args)["seconds"]
    print(f"best-of-64 + AISP (N = 64), 16 prompts: float32 {stage_fp32:.1f} s, bfloat16 {stage_bf16:.1f} s "
          f"({stage_fp32 / stage_bf16:.2f}x)", flush=True)
    g32, g16 = _run("float32", "greedy", args)["tokens"], _run("bfloat16", "greedy", args)["tokens"]
    pairs = [(a, b) for x, y in zip(g32, g16) for a, b in zip(x + [None] * (len(y) - len(x)),
                                                             y + [None] * (len(x) - len(y)))]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    same = sum(x == y for x, y in zip(g32, g16)) / len(g32)
    print(f"greedy tokens that agree: {agree:.1%}; identical responses: {same:.1%}")
    cpu_flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    write_json(args.out, {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch_threads": THREADS,
        "amx_bf16": "amx_bf16" in cpu_flags, "avx512_bf16": "avx512_bf16" in cpu_flags,
        "bf16_over_fp32_tokens_per_s": bf16 / fp32, "bf16_head_fp32_over_fp32_tokens_per_s": bf16_head / fp32,
        "no_bf16_units": {"isa": isa, "bf16_over_fp32_tokens_per_s": bf16_n / fp32_n},
        "bf16_over_fp32_stage_wall_clock": stage_fp32 / stage_bf16,
        "greedy_token_agreement": agree, "greedy_identical_responses": same, "greedy_prompts": len(g32),
        "details": {"tokens_per_s": {"float32": fp32, "bfloat16": bf16, "bfloat16_head_float32": bf16_head,
                                     f"float32_{isa}": fp32_n, f"bfloat16_{isa}": bf16_n},
                    "stage_seconds": {"float32": stage_fp32, "bfloat16": stage_bf16}},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

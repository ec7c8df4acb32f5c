"""ARGS: alignment as reward-guided search (Khanov et al., ICLR 2024), a baseline of the paper.

At every decoding step the top-k next tokens by LM logit are each appended to the response so
far, the k extended responses are decoded and scored by the reward model in one batched call,
and the next token is chosen by the score

    s_j = logit_j + w * reward(x, y_<t + token_j),      j = 1..k

either greedily (argmax s, the paper's "ARGS-greedy") or by sampling from softmax(s / temperature)
over the k candidates ("ARGS-stochastic").

"logit" is the LM's raw, unnormalised logit, as in the paper's equation and in the official code
(``argsearch.py`` takes ``torch.topk`` of ``mout.logits[:, -1]``). Raw logits and log-probabilities
differ by the log-partition function, a constant over the k candidates of one step, so the greedy
choice and the softmax over candidates are the same under either; only the printed scores differ.

Differences from the official code, all deliberate: we stop at EOS (the official loop always runs
``max_new_token`` steps), the reward model sees the decoded text (prompt as the raw user turn,
response as text) rather than the LM's token ids (so any reward model works, not only one that
shares the LM's tokenizer), and the stochastic variant defaults to temperature 1 (the official
default is 0.7; pass ``temperature=0.7`` to match it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import ParameterError, check_choice, check_number
from .engine import prompt_generator
from .metrics import CostMeter
from .rewards import check_scores, judge_all
from .sampling import PrelogitSampler
from .shard import run_sharded

DECODES = ("greedy", "sample")


@dataclass
class ArgsResult:
    """One ARGS response.

    text: decoded response (special tokens removed). tokens: (T,) generated ids, EOS included.
    finished: True if it ended with EOS. Per step t (T steps, k' = min(k, vocab) candidates):
    candidates (T, k') token ids sorted by LM logit, descending; logits (T, k') their raw
    logits; rewards (T, k') the reward of each extended response; chosen (T,) the index into
    the k' candidates that was taken (0 = the plain greedy token).
    kl_steps (T,) float64: per step, the exact token-level KL(q_t || p_t) of ARGS's own next-token
    distribution q_t against the base model's sampling distribution p_t on the same prefix, i.e.
    ``sampler.next_token_probs`` of the LM's unmodified logits (the sampler's temperature, top-k and
    top-p). ARGS-greedy's q_t is the point mass on the chosen token, so the term is -log p_t(chosen);
    ARGS-stochastic's q_t is softmax(score / temperature) over the k' candidates, so the term is
    sum_j q_j (log q_j - log p_t(c_j)). A term is +inf where q_t puts mass on a token that the
    sampler's top-k or top-p removed from p_t. :attr:`kl` (their sum over the response, EOS
    included) is one sample of the sequence-level KL(pi_ARGS || pi_ref); its mean over prompts
    estimates the expected KL, and for ARGS-greedy it is exactly -log pi_ref(y | x).
    cost: forward calls (one per generated token, the prefill included), texts scored
    (reward_calls = k' per step), score calls (one per step, shared with the other prompts of a
    batched run) and the time split.
    """

    text: str
    tokens: torch.Tensor
    finished: bool
    candidates: torch.Tensor
    logits: torch.Tensor
    rewards: torch.Tensor
    chosen: torch.Tensor
    kl_steps: torch.Tensor
    cost: CostMeter = field(default_factory=CostMeter)

    @property
    def forward_calls(self) -> int:
        return self.cost.forward_calls

    @property
    def reward_calls(self) -> int:
        return self.cost.reward_calls

    @property
    def kl(self) -> float:
        """The response's KL against the base model in nats: the sum of :attr:`kl_steps`."""
        return float(self.kl_steps.sum())

    @property
    def deviation_rate(self) -> float:
        """Share of steps where the reward changed the choice away from the top-logit token."""
        return float((self.chosen != 0).float().mean()) if self.chosen.numel() else 0.0

    def as_dict(self) -> dict:
        return {"response": self.text, "tokens": self.tokens.tolist(), "finished": self.finished,
                "chosen": self.chosen.tolist(), "deviation_rate": self.deviation_rate, "kl_sequence": self.kl,
                "cost": self.cost.as_dict()}


def _base_log_probs(sampler: PrelogitSampler, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens), shape (b, k) float64 on the CPU, under the base model's sampling distribution
    p = ``sampler.next_token_probs(logits)``: truncated (temperature, top-k, top-p) in float32 exactly as
    the sampler does, normalised in float64 (as :meth:`PrelogitSampler.token_kl`); -inf where the
    truncation removed a token."""
    return sampler.next_token_log_probs(logits).gather(1, tokens.to(logits.device)).cpu()


def args_generate_many(sampler: PrelogitSampler, prompts: Sequence[str | Sequence[int] | torch.Tensor],
                       user_texts: Sequence[str], reward: Any, k: int = 10, w: float = 1.0, max_new_tokens: int | None = None,
                       decode: str = "greedy", generators: Sequence[torch.Generator | None] | None = None,
                       temperature: float = 1.0) -> list[ArgsResult]:
    """ARGS on several prompts at once: one row per prompt in the sampler's batched loop.

    At every step the k candidates of all prompts still generating go into one reward call (the
    reward model chunks it). A prompt's result does not depend on the others: its candidates come
    from its own logits, its reward from its own texts, and with ``decode="sample"`` its draw from
    its own generator. Arguments as :func:`args_generate`; ``generators`` gives one per prompt.
    """
    check_number("k", k, low=1, integer=True)
    check_number("w", w, low=0)
    check_choice("decode", decode, DECODES)
    check_number("temperature", temperature, low=0, low_open=True)
    if isinstance(user_texts, str) or not all(isinstance(u, str) for u in user_texts):
        raise ParameterError("user_texts must be a list of strings (the raw user turns)")
    if len(user_texts) != len(prompts) or not prompts:
        raise ParameterError(f"give one user text per prompt: {len(prompts)} prompts, {len(user_texts)} user texts")
    if not callable(getattr(reward, "score", None)):
        raise ParameterError(f"reward must have a score(prompts, responses) method, got {type(reward).__name__}")
    generators = list(generators) if generators is not None else [None] * len(prompts)
    if len(generators) != len(prompts):
        raise ParameterError(f"give one generator per prompt: {len(prompts)} prompts, {len(generators)} generators")
    tokenizer = sampler.tokenizer
    P = len(prompts)
    steps: list[dict[str, list]] = [{"cands": [], "logits": [], "rewards": [], "chosen": [], "kl": []}
                                    for _ in range(P)]
    meters = [CostMeter() for _ in range(P)]
    reward_seconds = 0.0

    def choose(logits: torch.Tensor, t: int, rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        nonlocal reward_seconds
        top = torch.topk(logits.float(), min(k, logits.shape[-1]))  # sorted by logit, descending
        kk = top.indices.shape[1]
        t0 = time.perf_counter()
        # Decode prefix + candidate together: BPE pieces merge with their neighbours.
        texts = [x.strip() for x in tokenizer.batch_decode(
            [prefix[i].tolist() + [c] for i in range(len(rows)) for c in top.indices[i].tolist()],
            skip_special_tokens=True)]
        r = check_scores(reward.score([user_texts[int(p)] for p in rows for _ in range(kk)], texts), len(texts),
                         getattr(reward, "name", type(reward).__name__)).view(len(rows), kk)
        seconds = time.perf_counter() - t0
        reward_seconds += seconds
        # float64: with a large w, float32 would round away the logit that breaks reward ties.
        score = top.values.cpu().double() + w * r.double()
        logp = _base_log_probs(sampler, logits, top.indices)  # (b, kk) float64
        chosen = []
        for i, p in enumerate(rows.tolist()):
            if decode == "greedy":
                j = int(torch.argmax(score[i]))  # first maximum: ties go to the higher logit
                kl = -float(logp[i, j])  # q = the point mass on candidate j
            else:
                j = int(torch.multinomial(torch.softmax(score[i] / temperature, dim=0), 1, generator=generators[p]))
                logq = torch.log_softmax(score[i] / temperature, dim=0)
                q = logq.exp()
                # 0 log 0 = 0 where q underflows, whatever p is there; >= 0 up to rounding (p sums to <= 1 on them)
                kl = max(float(torch.where(q > 0, q * (logq - logp[i]), torch.zeros_like(q)).sum()), 0.0)
            chosen.append(j)
            st = steps[p]
            st["cands"].append(top.indices[i].cpu())
            st["logits"].append(top.values[i].cpu())
            st["rewards"].append(r[i])
            st["chosen"].append(j)
            st["kl"].append(kl)
            meters[p].add_scored(kk)
            meters[p].time_reward_s += seconds / len(rows)
        return top.indices[torch.arange(len(rows)), torch.tensor(chosen)]

    t0 = time.perf_counter()
    gens = sampler.generate_many(prompts, [1] * P, max_new_tokens=max_new_tokens, decode="greedy", chooser=choose)
    generation_seconds = time.perf_counter() - t0 - reward_seconds
    total = sum(g.new_tokens for g in gens) or 1
    out = []
    for p, g in enumerate(gens):
        m = meters[p]
        m.add_generation(g)
        m.time_generation_s += generation_seconds * g.new_tokens / total
        st = steps[p]
        out.append(ArgsResult(text=g.texts[0], tokens=g.tokens[0, : g.lengths[0]].clone(), finished=bool(g.finished[0]),
                              candidates=torch.stack(st["cands"]), logits=torch.stack(st["logits"]),
                              rewards=torch.stack(st["rewards"]), chosen=torch.tensor(st["chosen"], dtype=torch.long),
                              kl_steps=torch.tensor(st["kl"], dtype=torch.float64), cost=m))
    return out


def args_records(sampler: PrelogitSampler, reward: Any, judges: Mapping[str, Any], rows: list[dict], k: int, w: float,
                 decode: str, seed: int, temperature: float) -> list[dict]:
    """The args stage's records: ARGS and plain greedy decoding on the prompt ``rows`` (``load_prompts``
    rows), one record per prompt, in prompt order.

    All prompts run in one batched ARGS call (at each step every prompt's k candidates go into one
    reward call), each with its own generator, seeded by (seed, prompt id)
    (:func:`prelogit.engine.prompt_generator`); then one batched greedy call. Each record holds the
    ARGS response with its reward (``reward``) and the held-out judges' scores (``judges``), its tokens,
    deviation rate from greedy, sequence KL to the base model (nats) and cost, and the greedy response
    with its reward, next to ``prompt_id`` and ``prompt``. Under ``accelerate launch`` each process runs its
    share of the prompts and every process gets all records back (:func:`prelogit.shard.run_sharded`).
    """
    def record(p: dict, res: ArgsResult, greedy: str) -> dict:
        r_args, r_greedy = reward.score([p["text"]] * 2, [res.text, greedy]).tolist()
        scores = judge_all(judges, [p["text"]], [res.text])
        return {
            "prompt_id": p["id"], "prompt": p["text"], "response": res.text, "reward": r_args,
            "judges": {j: v[0] for j, v in scores.items()},
            "tokens": res.tokens.tolist(), "finished": res.finished, "chosen": res.chosen.tolist(),
            "deviation_rate": res.deviation_rate, "kl_sequence": res.kl,
            "forward_calls": res.forward_calls, "reward_calls": res.reward_calls, "cost": res.cost.as_dict(),
            "greedy_response": greedy, "greedy_reward": r_greedy,
            "config": {"k": k, "w": w, "decode": decode, "temperature": temperature, "max_new_tokens": sampler.max_new_tokens},
        }

    def run(share: list[dict]) -> list[dict]:
        results = args_generate_many(sampler, [p["prompt"] for p in share], [p["text"] for p in share], reward, k=k, w=w,
                                     decode=decode, generators=[prompt_generator(seed, p["id"]) for p in share],
                                     temperature=temperature)
        greedies = [g.texts[0] for g in sampler.generate_many([p["prompt"] for p in share], [1] * len(share),
                                                              decode="greedy")]
        return [record(p, res, greedy) for p, res, greedy in zip(share, results, greedies)]

    return run_sharded(rows, run)


def args_generate(model: Any, tokenizer: Any, prompt_ids_or_text: str | Sequence[int] | torch.Tensor, user_text: str,
                  reward: Any, k: int = 10, w: float = 1.0, max_new_tokens: int = 24, decode: str = "greedy",
                  generator: torch.Generator | None = None, temperature: float = 1.0) -> ArgsResult:
    """Generate one response with ARGS (:func:`args_generate_many` with a single prompt).

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        prompt_ids_or_text: the templated prompt as text, or its token ids.
        user_text: the raw user turn, passed to the reward model as the prompt.
        reward: any object with ``score(prompts, responses) -> (n,)`` (see :mod:`prelogit.rewards`).
        k: candidates per step (top-k by logit), >= 1; capped at the vocabulary size.
        w: reward weight, >= 0, in logit units per reward unit. w = 0 with greedy decoding is plain
            greedy decoding (the reward model is still called, so the cost is the same).
        max_new_tokens: stop after this many tokens unless EOS comes first.
        decode: ``greedy`` (argmax of the score) or ``sample`` (softmax of score / temperature over
            the k candidates, drawn with ``generator``).
        temperature: only for ``sample``, > 0.
    Returns:
        An :class:`ArgsResult`.
    """
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    if not isinstance(user_text, str):
        raise ParameterError(f"user_text must be a string (the raw user turn), got {type(user_text).__name__}")
    # The sampler supplies the prompt encoding, the EOS set and the decoding loop, so ARGS and every
    # other method read prompts and stop on exactly the same tokens.
    sampler = PrelogitSampler(model, tokenizer, max_new_tokens=max_new_tokens, decode="greedy")
    return args_generate_many(sampler, [prompt_ids_or_text], [user_text], reward, k=k, w=w, decode=decode,
                              generators=[generator], temperature=temperature)[0]

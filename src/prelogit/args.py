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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checks import ParameterError, check_choice, check_number
from .metrics import CostMeter
from .sampling import PrelogitSampler

DECODES = ("greedy", "sample")


@dataclass
class ArgsResult:
    """One ARGS response.

    text: decoded response (special tokens removed). tokens: (T,) generated ids, EOS included.
    finished: True if it ended with EOS. Per step t (T steps, k' = min(k, vocab) candidates):
    candidates (T, k') token ids sorted by LM logit, descending; logits (T, k') their raw
    logits; rewards (T, k') the reward of each extended response; chosen (T,) the index into
    the k' candidates that was taken (0 = the plain greedy token).
    cost: forward calls (one per generated token, the prefill included), texts scored
    (reward_calls = k' per step), score calls (one per step) and the time split.
    """

    text: str
    tokens: torch.Tensor
    finished: bool
    candidates: torch.Tensor
    logits: torch.Tensor
    rewards: torch.Tensor
    chosen: torch.Tensor
    cost: CostMeter = field(default_factory=CostMeter)

    @property
    def forward_calls(self) -> int:
        return self.cost.forward_calls

    @property
    def reward_calls(self) -> int:
        return self.cost.reward_calls

    @property
    def deviation_rate(self) -> float:
        """Share of steps where the reward changed the choice away from the top-logit token."""
        return float((self.chosen != 0).float().mean()) if self.chosen.numel() else 0.0

    def as_dict(self) -> dict:
        return {"response": self.text, "tokens": self.tokens.tolist(), "finished": self.finished,
                "chosen": self.chosen.tolist(), "deviation_rate": self.deviation_rate, "cost": self.cost.as_dict()}


def args_generate(model, tokenizer, prompt_ids_or_text: str | Sequence[int] | torch.Tensor, user_text: str, reward,
                  k: int = 10, w: float = 1.0, max_new_tokens: int = 24, decode: str = "greedy",
                  generator: torch.Generator | None = None, temperature: float = 1.0) -> ArgsResult:
    """Generate one response with ARGS.

    Args:
        model, tokenizer: the causal LM (batch 1, with a ``DynamicCache``) and its tokenizer.
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
    check_number("k", k, low=1, integer=True)
    check_number("w", w, low=0)
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    check_choice("decode", decode, DECODES)
    check_number("temperature", temperature, low=0, low_open=True)
    if not isinstance(user_text, str):
        raise ParameterError(f"user_text must be a string (the raw user turn), got {type(user_text).__name__}")
    if not callable(getattr(reward, "score", None)):
        raise ParameterError(f"reward must have a score(prompts, responses) method, got {type(reward).__name__}")

    # The sampler supplies the prompt encoding and the EOS set, so ARGS and every other method
    # read prompts and stop on exactly the same tokens.
    base = PrelogitSampler(model, tokenizer, max_new_tokens=max_new_tokens, decode="greedy")
    ids = base.encode(prompt_ids_or_text)
    device = base.device

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    meter = CostMeter()
    response: list[int] = []
    cands, cand_logits, cand_rewards, chosen = [], [], [], []
    finished = False
    eos = set(base.eos_ids.tolist())
    step_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            with meter.generation():
                mask = torch.ones(1, ids.shape[1] + len(response), dtype=torch.long, device=device)
                out = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
                logits = out.logits[0, -1].float()
                top = torch.topk(logits, min(k, logits.shape[-1]))  # sorted by logit, descending
            meter.forward_calls += 1
            with meter.reward():
                # Decode prefix + candidate together: BPE pieces merge with their neighbours.
                texts = [t.strip() for t in tokenizer.batch_decode(
                    [response + [c] for c in top.indices.tolist()], skip_special_tokens=True)]
            r = meter.score(reward, user_text, texts)
            with meter.generation():
                # float64: with a large w, float32 would round away the logit that breaks reward ties.
                score = top.values.cpu().double() + w * r.double()
                if decode == "greedy":
                    j = int(torch.argmax(score))  # first maximum: ties go to the higher logit
                else:
                    probs = torch.softmax(score / temperature, dim=0)
                    j = int(torch.multinomial(probs, 1, generator=generator))
                tok = int(top.indices[j])
            response.append(tok)
            meter.new_tokens += 1
            cands.append(top.indices.cpu())
            cand_logits.append(top.values.cpu())
            cand_rewards.append(r)
            chosen.append(j)
            if tok in eos:
                finished = True
                break
            step_ids = torch.tensor([[tok]], device=device)
    meter.generations = 1
    text = tokenizer.decode(response, skip_special_tokens=True).strip()
    return ArgsResult(text=text, tokens=torch.tensor(response, dtype=torch.long), finished=finished,
                      candidates=torch.stack(cands), logits=torch.stack(cand_logits),
                      rewards=torch.stack(cand_rewards), chosen=torch.tensor(chosen, dtype=torch.long), cost=meter)

"""Batched generation with control inputs on the pre-logits (spec section 1).

The pre-logit z_t is the input of the LM head (``model.get_output_embeddings()``), i.e. the last
hidden state after the final norm. A forward pre-hook on the head replaces z_t by z_t + v_t for
the first tau generated tokens. Because W (z + v) + b = (W z + b) + W v, the perturbation never
enters the KV cache: only the chosen token is fed back.

The prompt is prefilled once with batch size 1; its KV cache is then repeated for the n samples
(``generate(num_return_sequences=n)`` prefills it n times). Rows that reach EOS are dropped from
the batch, so finished samples cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .checks import ParameterError, check_choice, check_number

#: A pre-logit transform: ``fn(z, t, rows) -> z'`` with z of shape (b, d) (b = 1 at the shared
#: prefill, where the result may broadcast to all rows), t the 0-based index of the token being
#: generated and ``rows`` (b',) the sample indices that z' is for.
PrelogitFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

DECODES = ("sample", "greedy")


@dataclass
class Generation:
    """n continuations of one prompt.

    tokens: (n, T) generated ids, ``pad_id`` after each sample's end; T <= max_new_tokens.
    lengths: (n,) generated tokens per sample, EOS included.
    finished: (n,) True where the sample ended with EOS (False: cut at max_new_tokens).
    texts: the decoded responses, special tokens removed.
    forward_calls: LM forward passes used (the prefill counts once).
    prelogits: (n, T, d) unperturbed pre-logits z_t (float32), only if recorded.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    forward_calls: int
    prelogits: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return int(self.lengths.sum())


class _HeadHook:
    """Forward pre-hook on the LM head that applies a pre-logit transform and records z_t."""

    def __init__(self, head: torch.nn.Module):
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.last: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        h = args[0]
        if h.shape[1] != 1:
            raise RuntimeError("the sampler calls the model with logits_to_keep=1; the LM head saw "
                               f"{h.shape[1]} positions. Does this model support logits_to_keep?")
        z = h[:, -1, :]
        self.last = z
        if self.fn is None:
            return None
        return (self.fn(z).unsqueeze(1),)

    def remove(self) -> None:
        self._handle.remove()


def control_fn(control: torch.Tensor) -> PrelogitFn:
    """The AISP transform z_t -> z_t + v_t for t < tau, from V of shape (n, tau, d)."""
    tau = control.shape[1]

    def fn(z: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        if t >= tau:
            return z
        return z + control[rows, t].to(device=z.device, dtype=z.dtype)

    return fn


class PrelogitSampler:
    """Generates n continuations of a prompt, optionally with control on the pre-logits.

    Args:
        model, tokenizer: a causal LM and its tokenizer (see :func:`prelogit.models.load_model`).
        max_new_tokens: generation stops at EOS or after this many tokens.
        decode: ``sample`` (multinomial at ``temperature``, optional ``top_k``/``top_p``) or
            ``greedy`` (argmax of the perturbed logits; all randomness then comes from V).
        temperature, top_k, top_p: as in ``transformers`` (top_k = 0 and top_p = 1 disable them).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 24, decode: str = "sample",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
        check_choice("decode", decode, DECODES)
        check_number("temperature", temperature, low=0, low_open=True)
        check_number("top_k", top_k, low=0, integer=True)
        check_number("top_p", top_p, low=0, high=1, low_open=True)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.decode = decode
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.head = model.get_output_embeddings()
        self.d = self.head.weight.shape[1]
        self.device = self.head.weight.device
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(eos, device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | torch.Tensor, chat: bool = False) -> torch.Tensor:
        """Token ids (1, P) of a prompt; ``chat`` wraps a user message in the chat template."""
        if isinstance(prompt, torch.Tensor):
            return prompt.view(1, -1).to(self.device)
        if isinstance(prompt, str):
            if chat:
                prompt = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        if len(ids) == 0:
            raise ParameterError("the prompt is empty; give at least one token")
        return torch.tensor([ids], device=self.device)

    # ---- decoding ------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, decode: str, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row from logits (b, V), with the processors in transformers' order."""
        logits = logits.float()
        if decode == "greedy":
            return logits.argmax(dim=-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k).values[..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cum <= (1 - self.top_p)
            drop_sorted[..., -1:] = False
            drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, n: int, control: torch.Tensor | None = None,
                 prelogit_fn: PrelogitFn | None = None, generator: torch.Generator | None = None,
                 max_new_tokens: int | None = None, decode: str | None = None,
                 record_prelogits: bool = False) -> Generation:
        """Generate n continuations of one prompt.

        Args:
            prompt: text (already templated) or token ids.
            n: number of samples, generated in one batch.
            control: V of shape (n, tau, d): v_t is added to the pre-logit of generated token t
                (t < tau). None or tau = 0 means no control.
            prelogit_fn: a general transform instead of ``control`` (used by RE-Control).
            generator: torch RNG for multinomial sampling (determinism per seed).
            record_prelogits: keep the unperturbed pre-logits z_t of every generated token.
        """
        check_number("n", n, low=1, integer=True)
        decode = decode or self.decode
        check_choice("decode", decode, DECODES)
        T = max_new_tokens or self.max_new_tokens
        check_number("max_new_tokens", T, low=1, integer=True)
        if control is not None and prelogit_fn is not None:
            raise ParameterError("give either control or prelogit_fn, not both")
        if control is not None:
            if control.dim() != 3 or control.shape[0] != n or control.shape[2] != self.d:
                raise ParameterError(f"control must have shape (n, tau, d) = ({n}, tau, {self.d}), "
                                     f"got {tuple(control.shape)}")
            prelogit_fn = control_fn(control) if control.shape[1] > 0 else None

        ids = self.encode(prompt)
        P = ids.shape[1]
        tokens = torch.full((n, T), self.pad_id, dtype=torch.long, device=self.device)
        lengths = torch.zeros(n, dtype=torch.long, device=self.device)
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        prelogits = torch.zeros(n, T, self.d, dtype=torch.float32) if record_prelogits else None
        active = torch.arange(n, device=self.device)

        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        hook = _HeadHook(self.head)
        calls = 0
        try:
            with torch.no_grad():
                step_ids, mask = ids, torch.ones(1, P, dtype=torch.long, device=self.device)
                for t in range(T):
                    if prelogit_fn is not None:
                        hook.fn = lambda z, t=t, rows=active: prelogit_fn(z, t, rows)
                    out = self.model(input_ids=step_ids, attention_mask=mask, past_key_values=cache,
                                     use_cache=True, logits_to_keep=1)
                    calls += 1
                    logits = out.logits[:, -1, :]
                    if t == 0:
                        # The shared prefill ran with batch 1: give every sample its own copy.
                        logits = logits.expand(len(active), -1)
                        cache.batch_repeat_interleave(n)
                    if record_prelogits:
                        prelogits[active.cpu(), t] = hook.last.float().expand(len(active), -1).cpu()
                    nxt = self._choose(logits, decode, generator)
                    tokens[active, t] = nxt
                    lengths[active] += 1
                    done = torch.isin(nxt, self.eos_ids)
                    finished[active[done]] = True
                    keep = ~done
                    if t == T - 1 or not keep.any():
                        break
                    if not keep.all():
                        cache.batch_select_indices(keep.nonzero().squeeze(1))
                        active, nxt = active[keep], nxt[keep]
                    step_ids = nxt[:, None]
                    mask = torch.ones(len(active), P + t + 1, dtype=torch.long, device=self.device)
        finally:
            hook.remove()
        T_used = int(lengths.max())
        texts = [self.tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True).strip()
                 for i in range(n)]
        return Generation(tokens=tokens[:, :T_used].cpu(), lengths=lengths.cpu(), finished=finished.cpu(),
                          texts=texts, forward_calls=calls,
                          prelogits=None if prelogits is None else prelogits[:, :T_used])

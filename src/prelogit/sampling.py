"""Batched generation with control inputs on the pre-logits (spec section 1), many prompts at once.

The pre-logit z_t is the input of the LM head (``model.get_output_embeddings()``), i.e. the last
hidden state after the final norm. A forward pre-hook on the head replaces z_t by z_t + v_t for
the first tau generated tokens. Because W (z + v) + b = (W z + b) + W v, the perturbation never
enters the KV cache: only the chosen token is fed back.

One call serves several prompts, each with its own number of rows (samples):

- the prompts are left-padded and prefilled together once, one row per prompt
  (:meth:`PrelogitSampler.prefill`); a :class:`Prefill` can be reused by later calls (AISP's K
  iterations share one), and its KV cache is gathered out to the rows of each micro-batch;
- rows are processed in micro-batches of at most ``max_rows`` rows, which bounds the memory of
  the KV cache and of the logits; rows that reach EOS leave their micro-batch at once;
- attention masks cover the left padding and position ids count each prompt's own tokens, so a
  row sees exactly what it would see alone;
- randomness is per prompt: before decoding, each prompt draws one uniform per (row, step) from
  its own generator, and a row's token at step t is the inverse-CDF draw of its uniform. Which
  other prompts share the call, the micro-batch size and the order in which rows finish therefore
  cannot change a prompt's draws; only float rounding of a differently shaped batch can, which
  the tests bound (``tests/test_sampling.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .checks import ParameterError, check_choice, check_number

#: A pre-logit transform: ``fn(z, t, rows) -> z'`` with z of shape (b, d), t the 0-based index of
#: the token being generated and ``rows`` (b,) the indices, among all rows of the call, that the
#: b pre-logits belong to (rows are numbered prompt by prompt, in the order the prompts were given).
PrelogitFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

#: A token rule instead of sampling: ``choose(logits, t, rows, prefix) -> tokens`` with logits (b, V)
#: of the b active rows at step t, ``rows`` (b,) their indices among all rows of the call and
#: ``prefix`` (b, t) the tokens they generated so far; returns (b,) token ids (used by ARGS).
Chooser = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]

DECODES = ("sample", "greedy")

#: Default rows per forward pass. With the embedded SmolLM2 in float32 a row's KV cache holds
#: about 46 KB per token, so 256 rows of 100 tokens take about 1.2 GB: laptop-sized.
DEFAULT_MAX_ROWS = 256


@dataclass
class Generation:
    """n continuations of one prompt.

    tokens: (n, T) generated ids, ``pad_id`` after each sample's end; T <= max_new_tokens.
    lengths: (n,) generated tokens per sample, EOS included.
    finished: (n,) True where the sample ended with EOS (False: cut at max_new_tokens).
    texts: the decoded responses, special tokens removed.
    forward_calls: LM forward passes this prompt's rows took part in (its prefill counts once,
        and not at all when the call reused an existing :class:`Prefill`).
    prelogits: (n, T, d) unperturbed pre-logits z_t (float32), only if recorded.
    kl: (n,) float64, only if recorded: per sample, the sum over its generated tokens (EOS
        included) of the exact token-level KL(q_t || p_t) between the distribution q_t the token
        was drawn from and the unsteered model's sampling distribution p_t on the same prefix
        (:meth:`PrelogitSampler.token_kl`). Its mean over samples is the Monte-Carlo estimate of
        the sequence-level KL(pi || pi_ref) of the steered policy against the base model.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    forward_calls: int
    prelogits: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Prefill:
    """Prompts prefilled together once, ready to be expanded to any number of rows each.

    ids: the prompts' token ids. mask: (B, P) attention mask, 0 on the left padding.
    lengths: (B,) real prompt tokens. z: (B, d) the unperturbed pre-logit of each prompt's first
    generated token. kv: per layer, the (keys, values) of the prompts, (B, heads, P, head_dim).
    """

    ids: list[list[int]]
    mask: torch.Tensor
    lengths: torch.Tensor
    z: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on.

    For a model dispatched by accelerate (``from_pretrained(device_map=...)``) that is the execution
    device of the module's hook: an offloaded module keeps its weights on the meta device between
    forward passes, so its parameters do not say where it runs. Otherwise it is the device of the
    module's first parameter.
    """
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return next(module.parameters()).device


class _HeadHook:
    """Forward pre-hook on the LM head that applies a pre-logit transform and records z_t.

    ``device``: where the transform receives z_t and where it is recorded. The hook runs before
    accelerate's own hook moves the head's input, so for a model spread over several devices z_t
    arrives on the device of the last layer; it is moved to ``device`` (the sampler's, where its
    callers keep their control tensors and value functions). On one device this is a no-op.
    """

    def __init__(self, head: torch.nn.Module, device: torch.device | None = None):
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.last: torch.Tensor | None = None
        self.device = device
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        h = args[0]
        if h.shape[1] != 1:
            raise RuntimeError("the sampler calls the model with logits_to_keep=1; the LM head saw "
                               f"{h.shape[1]} positions. Does this model support logits_to_keep?")
        z = h[:, -1, :]
        if self.device is not None and z.device != self.device:
            z = z.to(self.device)
        self.last = z
        if self.fn is None:
            return None
        return (self.fn(z).unsqueeze(1),)

    def remove(self) -> None:
        self._handle.remove()


def control_fn(control: torch.Tensor) -> PrelogitFn:
    """The AISP transform z_t -> z_t + v_t for t < tau, from V of shape (rows, tau, d)."""
    tau = control.shape[1]

    def fn(z: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        if t >= tau:
            return z
        # Summed in float32 (or the model's dtype if wider) and rounded to the model's dtype once: in a
        # bfloat16 model, rounding v first would add a second error of 2^-9 of v's own size. float32
        # and float64 models add exactly as they did before.
        acc = torch.promote_types(z.dtype, torch.float32)
        return (z.to(acc) + control[rows.to(control.device), t].to(device=z.device, dtype=acc)).to(z.dtype)

    return fn


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """One draw per row from the categorical ``probs`` (b, V), driven by uniforms ``u`` (b,) in [0, 1).

    Token j is chosen when cdf[j-1] <= u * cdf[V-1] < cdf[j]; a token of probability zero has an
    empty interval and is never chosen. The CDF is found in two levels, in float64: sums of
    blocks of ``block`` tokens locate the block, then a cumulative sum inside that one block
    locates the token. (A row-wise cumulative sum over a 50k vocabulary is a sequential scan and
    took 7% of decoding time; block sums vectorise.) Sums of float32 values in float64 are exact
    for any realistic vocabulary, so both levels see the same CDF.
    """
    b, V = probs.shape
    nb = -(-V // block)
    p = torch.nn.functional.pad(probs, (0, nb * block - V)) if nb * block != V else probs
    p = p.view(b, nb, block)
    block_cdf = p.sum(-1, dtype=torch.float64).cumsum(-1)  # (b, nb)
    x = u.to(torch.float64) * block_cdf[:, -1]
    k = torch.searchsorted(block_cdf, x.unsqueeze(1), right=True).squeeze(1).clamp_max(nb - 1)
    rows = torch.arange(b, device=probs.device)
    below = torch.where(k > 0, block_cdf[rows, (k - 1).clamp_min(0)], torch.zeros_like(x))
    inner = p[rows, k].to(torch.float64).cumsum(-1)  # (b, block)
    # x - below lies in [0, block total); keep it strictly below the block's last CDF value, so the
    # draw lands on a token of positive probability even if the two float64 sums differ in the last bit.
    rest = torch.minimum(x - below, torch.nextafter(inner[:, -1], torch.zeros_like(x)))
    j = torch.searchsorted(inner, rest.unsqueeze(1), right=True).squeeze(1).clamp_max(block - 1)
    return (k * block + j).clamp_max(V - 1)


class _AppendLayer(DynamicLayer):
    """A KV-cache layer with room reserved for the whole generation: appending a token writes in
    place and hands attention a view, where ``DynamicLayer`` concatenates (copying the whole cache
    at every token: 23% of decoding time at 256 rows). Dropping rows copies once, as before."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        rows, heads, length, dim = keys.shape
        self._k = keys.new_empty(rows, heads, capacity, dim)
        self._v = values.new_empty(rows, heads, capacity, values.shape[-1])
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self.length = length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        n = key_states.shape[-2]
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # A model spread over devices keeps each layer's cache on that layer's device.
        indices = indices.to(self._k.device)
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


class _OnDevice:
    """An index tensor, moved once to each device it is asked for (a model spread over devices keeps
    each layer's KV cache on that layer's device; indexing needs the index there or on the CPU)."""

    def __init__(self, index: torch.Tensor):
        self._copies = {index.device: index}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.device not in self._copies:
            self._copies[like.device] = next(iter(self._copies.values())).to(like.device)
        return self._copies[like.device]


def _select_rows(cache: DynamicCache, idx: torch.Tensor) -> None:
    """Keep the rows ``idx`` (CPU) of every layer of ``cache``, the index moved to each layer's device once."""
    on = _OnDevice(idx)
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        # every layer type a DynamicCache holds here has batch_select_indices (transformers types the list as a union)
        cast(DynamicLayer, layer).batch_select_indices(on(keys) if isinstance(keys, torch.Tensor) else idx)


@dataclass
class _Rule:
    """How a generate_many call chooses each token: the pre-logit transform, the decoding and its
    uniforms (R, T) float64 (sampling without a chooser), or a chooser that replaces the decoding."""

    fn: PrelogitFn | None
    decode: str
    u: torch.Tensor | None
    chooser: Chooser | None


@dataclass
class _Outputs:
    """The buffers of one generate_many call over R rows of B prompts, T steps, filled micro-batch by micro-batch.

    tokens: (R, T) long, ``pad_id`` after a row's end. lengths: (R,) generated tokens. finished: (R,)
    ended with EOS. calls: (B,) forward passes per prompt (the prefill counts once unless reused).
    prelogits: (R, T, d) float32 unperturbed z_t, if recorded. kl: (R,) float64 summed token KL, if recorded.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    calls: torch.Tensor
    prelogits: torch.Tensor | None
    kl: torch.Tensor | None

    @classmethod
    def empty(cls, counts: list[int], T: int, d: int, pad_id: int, prefilled: bool, record_prelogits: bool,
              record_kl: bool) -> _Outputs:
        R, B = sum(counts), len(counts)
        return cls(tokens=torch.full((R, T), pad_id, dtype=torch.long), lengths=torch.zeros(R, dtype=torch.long),
                   finished=torch.zeros(R, dtype=torch.bool),
                   calls=torch.zeros(B, dtype=torch.long) if prefilled else torch.ones(B, dtype=torch.long),
                   prelogits=torch.zeros(R, T, d, dtype=torch.float32) if record_prelogits else None,
                   kl=torch.zeros(R, dtype=torch.float64) if record_kl else None)

    def generations(self, counts: list[int], tokenizer: Any) -> list[Generation]:
        """One :class:`Generation` per prompt (its ``counts[i]`` consecutive rows), trimmed to its longest row."""
        out, start = [], 0
        for i, c in enumerate(counts):
            sl = slice(start, start + c)
            start += c
            T_used = int(self.lengths[sl].max())
            texts = [tokenizer.decode(self.tokens[r, : self.lengths[r]].tolist(), skip_special_tokens=True).strip()
                     for r in range(sl.start, sl.stop)]
            out.append(Generation(tokens=self.tokens[sl, :T_used].clone(), lengths=self.lengths[sl].clone(),
                                  finished=self.finished[sl].clone(), texts=texts, forward_calls=int(self.calls[i]),
                                  prelogits=None if self.prelogits is None else self.prelogits[sl, :T_used].clone(),
                                  kl=None if self.kl is None else self.kl[sl].clone()))
        return out


class _RowBatch:
    """One micro-batch of rows being decoded: the prompts' KV cache gathered to its rows (with room for T
    tokens), its attention mask and positions, the rows still active and their last tokens."""

    def __init__(self, sampler: PrelogitSampler, pre: Prefill, rows: torch.Tensor, prompt_of_row: torch.Tensor,
                 T: int):
        self.sampler, self.pre = sampler, pre
        src = prompt_of_row[rows].to(sampler.device)
        self.on = _OnDevice(src)  # each layer's prefill cache lives on that layer's device
        self.P = pre.mask.shape[1]
        self.cache = DynamicCache(config=sampler.model.config)
        if all(type(layer) is DynamicLayer for layer in self.cache.layers) and len(self.cache.layers) == len(pre.kv):
            self.cache.layers = [_AppendLayer(k[self.on(k)], v[self.on(v)], self.P + T) for k, v in pre.kv]
        else:  # sliding-window or other special layers: let transformers manage them
            for layer, (k, v) in enumerate(pre.kv):
                self.cache.update(k[self.on(k)], v[self.on(v)], layer)
        self.mask = torch.cat([pre.mask[src], torch.ones(len(rows), T, dtype=torch.long, device=sampler.device)], dim=1)
        self.plen = pre.lengths[src]
        self.active = rows
        self.nxt: torch.Tensor | None = None

    def logits(self, t: int) -> torch.Tensor:
        """The next-token logits (b, V) of the active rows at step t (the LM head's hook sees their z_t)."""
        if t == 0:
            # The first token's pre-logit comes from the prefill: only the head runs.
            return self.sampler.head(self.pre.z[self.on(self.pre.z)].unsqueeze(1))[:, -1]
        assert self.nxt is not None  # chosen at step t - 1
        return self.sampler.model(input_ids=self.nxt[:, None], attention_mask=self.mask[:, : self.P + t],
                                  position_ids=(self.plen + t - 1)[:, None], past_key_values=self.cache,
                                  use_cache=True, logits_to_keep=1).logits[:, -1]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows where ``keep`` (b,) is False from the cache, mask, positions and active rows."""
        assert self.nxt is not None
        idx = keep.nonzero().squeeze(1)
        _select_rows(self.cache, idx)
        self.active, self.nxt = self.active[keep], self.nxt[keep.to(self.nxt.device)]
        self.mask, self.plen = self.mask[idx], self.plen[idx]


class PrelogitSampler:
    """Generates continuations of many prompts at once, optionally with control on the pre-logits.

    Args:
        model, tokenizer: a causal LM and its tokenizer (see :func:`prelogit.models.load_model`).
        max_new_tokens: generation stops at EOS or after this many tokens.
        decode: ``sample`` (multinomial at ``temperature``, optional ``top_k``/``top_p``) or
            ``greedy`` (argmax of the perturbed logits; all randomness then comes from V).
        temperature, top_k, top_p: as in ``transformers`` (top_k = 0 and top_p = 1 disable them).
        max_rows: rows per forward pass (micro-batch size); bounds memory, not the results.

    Devices: :attr:`device` is the input embedding's device. Token ids and masks are made there,
    and pre-logit transforms receive z_t there (and :attr:`Prefill.z` is kept there). For a model on
    one device that is simply the model's device. For a model spread over several GPUs by
    ``device_map="auto"`` (:func:`prelogit.models.load_model`), accelerate's hooks carry the inputs
    of each layer to its device; the KV cache of each layer stays on that layer's device and row
    selections are moved to it; logits come back on the LM head's device or the inputs', and what
    is computed from them follows ``logits.device``.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 24, decode: str = "sample",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
        check_choice("decode", decode, DECODES)
        check_number("temperature", temperature, low=0, low_open=True)
        check_number("top_k", top_k, low=0, integer=True)
        check_number("top_p", top_p, low=0, high=1, low_open=True)
        check_number("max_rows", max_rows, low=1, integer=True)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.decode = decode
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.max_rows = max_rows
        self.head = model.get_output_embeddings()
        self.d = self.head.weight.shape[1]
        # Where the token ids go. On one device this is the LM head's device as well.
        self.device = execution_device(model.get_input_embeddings())
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

    @torch.no_grad()
    def prefill(self, prompts: Sequence[str | Sequence[int] | torch.Tensor]) -> Prefill:
        """Left-pad and prefill ``prompts`` (templated text or ids), ``max_rows`` prompts per pass.

        Every prompt is padded to the longest one in the list, so that the rows of any subset can
        later be gathered into one micro-batch.
        """
        if isinstance(prompts, (str, torch.Tensor)) or len(prompts) == 0:
            raise ParameterError("prompts must be a non-empty list of prompts (text or token ids)")
        ids = [self.encode(p)[0].tolist() for p in prompts]
        P = max(len(x) for x in ids)
        pad = torch.full((len(ids), P), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(ids), P, dtype=torch.long, device=self.device)
        for i, x in enumerate(ids):
            pad[i, P - len(x):] = torch.tensor(x, device=self.device)
            mask[i, P - len(x):] = 1
        # Positions count each prompt's own tokens (0 at its first real token), as in generate().
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        zs: list[torch.Tensor] = []
        kv_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        hook = _HeadHook(self.head, self.device)
        try:
            for s in range(0, len(ids), self.max_rows):
                cache = DynamicCache(config=self.model.config)
                self.model(input_ids=pad[s:s + self.max_rows], attention_mask=mask[s:s + self.max_rows],
                           position_ids=positions[s:s + self.max_rows], past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
                assert hook.last is not None  # the head's hook ran in the forward pass above
                zs.append(hook.last)
                # after that pass every layer holds its keys and values (transformers types them as optional)
                kv_parts.append(cast("list[tuple[torch.Tensor, torch.Tensor]]",
                                     [(layer.keys, layer.values) for layer in cast("list[DynamicLayer]", cache.layers)]))
        finally:
            hook.remove()
        kv = [(torch.cat([part[i][0] for part in kv_parts]), torch.cat([part[i][1] for part in kv_parts]))
              for i in range(len(kv_parts[0]))] if len(kv_parts) > 1 else kv_parts[0]
        return Prefill(ids=ids, mask=mask, lengths=mask.sum(-1), z=torch.cat(zs), kv=kv)

    # ---- decoding ------------------------------------------------------------------------------
    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (b, V) after temperature, top-k and top-p (dropped tokens at -inf), in transformers' order."""
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
        return logits

    def next_token_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling distribution (b, V) from logits (b, V): temperature, top-k, top-p in transformers' order."""
        return torch.softmax(self._truncate(logits.float()), dim=-1)

    def next_token_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log of :meth:`next_token_probs`, shape (b, V) float64: truncated in float32 exactly as the
        sampler does (so the support is the sampler's), normalised in float64; -inf off the support."""
        return torch.log_softmax(self._truncate(logits.float()).double(), dim=-1)

    def token_kl(self, steered: torch.Tensor, base: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Token-level KL(q || p), shape (b,) float64, of the steered next-token distribution q against the
        unsteered sampling distribution p = softmax(truncate(base)).

        With ``chosen`` (b,) the steered policy is deterministic (greedy decoding): q is the point mass
        on the chosen token and the KL is -log p(chosen). Otherwise q = softmax(truncate(steered)),
        the distribution ``sample`` decoding draws from (both from :meth:`next_token_log_probs`). It is
        +inf where q puts mass on a token that top-k or top-p removed from p.
        """
        logp = self.next_token_log_probs(base)
        if chosen is not None:
            return -logp.gather(1, chosen.view(-1, 1).to(logp.device)).squeeze(1)
        logq = self.next_token_log_probs(steered)
        q = logq.exp()
        # 0 * log 0 = 0 where q has no mass (top-k/top-p), whatever p is there
        return torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1).clamp_min(0)

    def _choose(self, logits: torch.Tensor, decode: str, u: torch.Tensor | None) -> torch.Tensor:
        """Next token per row from logits (b, V): argmax, or the inverse-CDF draw of the uniforms u (b,)."""
        if decode == "greedy":
            return logits.float().argmax(dim=-1)
        assert u is not None  # generate_many draws the uniforms whenever it samples without a chooser
        return inverse_cdf_sample(self.next_token_probs(logits), u)

    def generate(self, prompt: str | Sequence[int] | torch.Tensor | Prefill, n: int,
                 control: torch.Tensor | None = None, prelogit_fn: PrelogitFn | None = None,
                 generator: torch.Generator | None = None, max_new_tokens: int | None = None,
                 decode: str | None = None, record_prelogits: bool = False, record_kl: bool = False) -> Generation:
        """Generate n continuations of one prompt: :meth:`generate_many` with a single prompt.

        Args:
            prompt: text (already templated), token ids, or a one-prompt :class:`Prefill`.
            n: number of samples.
            control: V of shape (n, tau, d): v_t is added to the pre-logit of generated token t
                (t < tau). None or tau = 0 means no control.
            prelogit_fn: a general transform instead of ``control`` (used by RE-Control).
            generator: torch RNG for token sampling (determinism per seed).
            record_prelogits: keep the unperturbed pre-logits z_t of every generated token.
            record_kl: record each sample's sequence-level KL terms against the unsteered model.
        """
        prompts = prompt if isinstance(prompt, Prefill) else [prompt]
        return self.generate_many(prompts, [n], controls=None if control is None else [control],
                                  prelogit_fn=prelogit_fn, generators=[generator], max_new_tokens=max_new_tokens,
                                  decode=decode, record_prelogits=record_prelogits, record_kl=record_kl)[0]

    def generate_many(self, prompts: Sequence[str | Sequence[int] | torch.Tensor] | Prefill, counts: Sequence[int],
                      controls: Sequence[torch.Tensor | None] | None = None, prelogit_fn: PrelogitFn | None = None,
                      generators: Sequence[torch.Generator | None] | None = None, max_new_tokens: int | None = None,
                      decode: str | None = None, record_prelogits: bool = False,
                      chooser: Chooser | None = None, record_kl: bool = False) -> list[Generation]:
        """Generate ``counts[i]`` continuations of each prompt i, all prompts in one batched run.

        Args:
            prompts: templated prompts or token ids, or a :class:`Prefill` of them (reused as is).
            counts: rows per prompt (>= 1 each).
            controls: per prompt, V of shape (counts[i], tau, d) or None (no control). Prompts may
                have different tau; a shorter one is padded with zeros, which leaves z unchanged.
            prelogit_fn: a general transform instead of ``controls``; its ``rows`` index the rows of
                the whole call, prompt by prompt.
            generators: per prompt, the RNG its token draws come from (None: torch's global RNG).
                Greedy decoding draws nothing.
            max_new_tokens, decode: override the sampler's.
            record_prelogits: keep the unperturbed pre-logits z_t of every generated token.
            chooser: a token rule replacing ``decode`` (see :data:`Chooser`); it draws no uniforms.
            record_kl: record :attr:`Generation.kl`, each sample's summed token-level KL against the
                unsteered model (one extra LM-head product per token when a control is on). Not with
                a ``chooser``, whose distribution only the chooser knows (ARGS records its own).
        Returns:
            One :class:`Generation` per prompt, in order.
        """
        decode = decode or self.decode
        check_choice("decode", decode, DECODES)
        T = max_new_tokens or self.max_new_tokens
        check_number("max_new_tokens", T, low=1, integer=True)
        counts = list(counts)
        for i, c in enumerate(counts):
            check_number(f"counts[{i}]" if len(counts) > 1 else "n", c, low=1, integer=True)
        reuse = isinstance(prompts, Prefill)
        if (len(prompts) if isinstance(prompts, Prefill) else len(list(prompts))) != len(counts):
            raise ParameterError(f"give one count per prompt: {len(prompts)} prompts, {len(counts)} counts")
        generators = list(generators) if generators is not None else [None] * len(counts)
        if len(generators) != len(counts):
            raise ParameterError(f"give one generator per prompt: {len(counts)} prompts, {len(generators)} generators")
        if controls is not None and prelogit_fn is not None:
            raise ParameterError("give either control or prelogit_fn, not both")
        if record_kl and chooser is not None:
            raise ParameterError("record_kl cannot be used with a chooser: the sampler does not know the chooser's "
                                 "distribution; record the KL inside the chooser instead")
        fn = prelogit_fn
        if controls is not None:
            control = self._stack_controls(controls, counts)
            fn = control_fn(control) if control is not None else None

        pre = prompts if isinstance(prompts, Prefill) else self.prefill(prompts)
        B, R = len(counts), sum(counts)
        prompt_of_row = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
        # One uniform per (row, step), drawn prompt by prompt from the prompt's own generator.
        u = None
        if decode == "sample" and chooser is None:
            u = torch.cat([torch.rand(c, T, generator=g, dtype=torch.float64) for c, g in zip(counts, generators)])
        rule = _Rule(fn=fn, decode=decode, u=u, chooser=chooser)
        out = _Outputs.empty(counts, T, self.d, self.pad_id, prefilled=reuse, record_prelogits=record_prelogits,
                             record_kl=record_kl)
        hook = _HeadHook(self.head, self.device)
        try:
            for s in range(0, R, self.max_rows):
                rows = torch.arange(s, min(s + self.max_rows, R))
                self._decode_rows(pre, rows, prompt_of_row, rule, T, hook, out)
        finally:
            hook.remove()
        return out.generations(counts, self.tokenizer)

    def _stack_controls(self, controls: Sequence[torch.Tensor | None], counts: list[int]) -> torch.Tensor | None:
        """One (R, tau_max, d) control tensor from per-prompt controls (zeros where a prompt has none)."""
        if len(controls) != len(counts):
            raise ParameterError(f"give one control (or None) per prompt: {len(counts)} prompts, {len(controls)} controls")
        for i, (c, n) in enumerate(zip(controls, counts)):
            if c is not None and (c.dim() != 3 or c.shape[0] != n or c.shape[2] != self.d):
                raise ParameterError(f"control must have shape (n, tau, d) = ({n}, tau, {self.d}), "
                                     f"got {tuple(c.shape)}" + (f" for prompt {i}" if len(counts) > 1 else ""))
        tau = max((c.shape[1] for c in controls if c is not None), default=0)
        if tau == 0:
            return None
        parts = []
        for c, n in zip(controls, counts):
            part = torch.zeros(n, tau, self.d)
            if c is not None:
                part[:, : c.shape[1]] = c.float()
            parts.append(part)
        return torch.cat(parts)

    @torch.no_grad()
    def _decode_rows(self, pre: Prefill, rows: torch.Tensor, prompt_of_row: torch.Tensor, rule: _Rule, T: int,
                     hook: _HeadHook, out: _Outputs) -> None:
        """Decode one micro-batch of ``rows`` to EOS or T tokens, writing into the call's buffers ``out``."""
        batch = _RowBatch(self, pre, rows, prompt_of_row, T)
        fn = rule.fn
        for t in range(T):
            if fn is not None:
                hook.fn = lambda z, t=t, r=batch.active: fn(z, t, r)
            logits = batch.logits(t)
            if t > 0:
                out.calls[torch.unique(prompt_of_row[batch.active])] += 1
            hook.fn = None
            batch.nxt, done = self._record_step(logits, hook.last, t, batch.active, rule, out)
            keep = ~done
            if t == T - 1 or not keep.any():
                break
            if not keep.all():
                batch.keep_rows(keep)

    def _record_step(self, logits: torch.Tensor, z: torch.Tensor | None, t: int, active: torch.Tensor, rule: _Rule,
                     out: _Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Step t of the ``active`` rows: record z_t, choose the next tokens from ``logits`` (b, V) by ``rule``,
        add their token-level KL, write them; returns the tokens (b,) and which rows ended with EOS (b,)."""
        if out.prelogits is not None:
            assert z is not None  # the head's hook ran for this step
            out.prelogits[active, t] = z.float().cpu()
        if rule.chooser is not None:
            nxt = rule.chooser(logits, t, active, out.tokens[active, :t]).to(logits.device)
        else:
            nxt = self._choose(logits, rule.decode, None if rule.u is None else rule.u[active, t].to(logits.device))
        if out.kl is not None:
            # The unsteered logits on the same prefix: the head on the recorded z (hook.fn is off now).
            assert z is not None  # the head's hook ran for this step
            base = logits if rule.fn is None else self.head(z.unsqueeze(1))[:, -1].to(logits.device)
            out.kl[active] += self.token_kl(logits, base, nxt if rule.decode == "greedy" else None).cpu()
        out.tokens[active, t] = nxt.cpu()
        out.lengths[active] += 1
        done = torch.isin(nxt, self.eos_ids.to(nxt.device)).cpu()
        out.finished[active[done]] = True
        return nxt, done

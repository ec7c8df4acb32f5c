"""RE-Control (Kong et al., NeurIPS 2024): gradient ascent on a learned value of the pre-logit.

1. Data: the base model answers training prompts; every generated token's pre-logit z_t (the
   input of the LM head) is kept, and each response is scored once by the reward model.
2. Value function: an MLP V(z) trained with the Bellman-style loss of the official code, per
   response with pre-logits z_0..z_{L-1} and reward r:

       loss = [ sum_{t < L-1} (V(z_t) - sg V(z_{t+1}))^2 + (V(z_{L-1}) - r)^2 ] / batch size

   (sg = stop-gradient: each prediction regresses on the next one, the last on the reward).
3. Decoding: at every step the pre-logit is moved by ``n_steps`` steps of plain gradient ascent,
   z <- z + step_size * grad V(z), then the next token is the argmax of the LM head at the moved
   pre-logit. The change never enters the KV cache (the pre-logit is the head's input).

Where this differs from the official code (github.com/Lingkai-Kong/RE-Control), deliberately:
its training step does not detach V(z_{t+1}) (its evaluation step does; we detach in both, the TD
reading the paper describes), and it picks the "last" position with ``mask.argmax``, which is the
first valid position; we use the actual last token. Its training script builds a 2-hidden-layer
MLP while its inference script loads a 1-hidden-layer one; ``layers`` selects either.
Units: z in pre-logit units (the LM head's input); V and rewards in reward units; ``step_size``
in pre-logit units per (reward unit per pre-logit unit), i.e. the SGD learning rate on z.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .checks import ParameterError, check_number
from .io import write_safetensors
from .metrics import CostMeter
from .rewards import judge_all
from .sampling import Generation, PrelogitSampler
from .shard import run_sharded

#: A value function: pre-logits (b, d) float32 -> values (b,).
ValueFn = Callable[[torch.Tensor], torch.Tensor]


class ValueMLP(nn.Module):
    """V(z): ``layers`` hidden ReLU layers of width ``hidden`` (default d), then a scalar output.

    Input (..., d) float32 pre-logits; output (...) values in reward units. ``layers = 0`` is a
    linear value function.
    """

    def __init__(self, d: int, hidden: int | None = None, layers: int = 2):
        super().__init__()
        check_number("d", d, low=1, integer=True)
        hidden = d if hidden is None else hidden
        check_number("hidden", hidden, low=1, integer=True)
        check_number("layers", layers, low=0, integer=True)
        self.d, self.hidden, self.layers = d, hidden, layers
        dims = [d] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)


# ---- data -------------------------------------------------------------------------------------

@dataclass
class ValueDataset:
    """Base-model responses with their pre-logits and rewards.

    prelogits: (N, T, d) float32, zero after each response's end. lengths: (N,) tokens per
    response (EOS included), >= 1. rewards: (N,) float32. prompt_index: (N,) which prompt each
    response answers. texts: the N responses. cost: generation and reward spent collecting them.
    """

    prelogits: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    prompt_index: torch.Tensor
    texts: list[str]
    cost: CostMeter = field(default_factory=CostMeter)

    def __len__(self) -> int:
        return self.prelogits.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """(N, T) True at valid positions."""
        return torch.arange(self.prelogits.shape[1])[None, :] < self.lengths[:, None]

    def subset(self, idx: torch.Tensor) -> ValueDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ValueDataset(self.prelogits[idx], self.lengths[idx], self.rewards[idx], self.prompt_index[idx],
                            [self.texts[i] for i in idx.tolist()], CostMeter())


def collect_training_data(sampler: PrelogitSampler, prompts: Sequence[str], user_texts: Sequence[str], reward: Any,
                          samples_per_prompt: int, generators: Sequence[torch.Generator | None] | None = None,
                          max_new_tokens: int | None = None) -> ValueDataset:
    """Sample ``samples_per_prompt`` responses per prompt from the base model and label them.

    All prompts are generated in one batched sampler call and scored in one reward call.

    Args:
        sampler: generates with its own decode settings (the official code samples at
            temperature 0.7, top-k 50, top-p 0.95); records the unperturbed pre-logits.
        prompts: templated prompts; user_texts: the raw user turns the reward sees, same order.
        reward: ``score(prompts, responses) -> (n,)``.
        samples_per_prompt: responses per prompt, >= 1.
        generators: one RNG per prompt for its token sampling (see :func:`prelogit.engine.prompt_generator`).
        max_new_tokens: overrides the sampler's.
    """
    if isinstance(prompts, str) or isinstance(user_texts, str):
        raise ParameterError("prompts and user_texts must be lists of strings, not a single string")
    prompts, user_texts = list(prompts), list(user_texts)
    if len(prompts) == 0 or len(prompts) != len(user_texts):
        raise ParameterError(f"prompts and user_texts must be non-empty and of equal length, got "
                             f"{len(prompts)} and {len(user_texts)}")
    check_number("samples_per_prompt", samples_per_prompt, low=1, integer=True)
    meter = CostMeter()
    with meter.generation():
        gens = sampler.generate_many(prompts, [samples_per_prompt] * len(prompts), generators=generators,
                                     max_new_tokens=max_new_tokens, record_prelogits=True)
    for g in gens:
        meter.add_generation(g)
    texts = [t for g in gens for t in g.texts]
    rewards = meter.score_pairs(reward, [u for u in user_texts for _ in range(samples_per_prompt)], texts)
    recorded = [cast(torch.Tensor, g.prelogits) for g in gens]  # set: record_prelogits=True above
    T = max(zg.shape[1] for zg in recorded)
    z = torch.cat([nn.functional.pad(zg, (0, 0, 0, T - zg.shape[1])) for zg in recorded])
    index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    return ValueDataset(prelogits=z, lengths=torch.cat([g.lengths for g in gens]), rewards=rewards,
                        prompt_index=index, texts=texts, cost=meter)


# ---- training ---------------------------------------------------------------------------------

def value_loss(value_fn: ValueFn, z: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The TD loss of the module docstring for a batch: z (B, T, d), lengths (B,), rewards (B,); a scalar.

    Sums squared errors over tokens and divides by the batch size, as the official code does, so
    a response contributes in proportion to its length.
    """
    B, T, _ = z.shape
    v = value_fn(z)  # (B, T)
    valid = torch.arange(T, device=z.device)[None, :] < lengths[:, None]
    pair = valid[:, :-1] & valid[:, 1:]
    td = ((v[:, :-1] - v[:, 1:].detach()) ** 2)[pair].sum()
    last = v[torch.arange(B, device=z.device), lengths - 1]
    return (td + ((last - rewards) ** 2).sum()) / B


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


@torch.no_grad()
def _evaluate(mlp: ValueMLP, data: ValueDataset) -> dict:
    v = mlp(data.prelogits)
    rows = torch.arange(len(data))
    last, first = v[rows, data.lengths - 1], v[:, 0]
    return {"loss": float(value_loss(mlp, data.prelogits, data.lengths, data.rewards)),
            "corr_last": _pearson(last, data.rewards), "corr_first": _pearson(first, data.rewards),
            "rmse_last": float(((last - data.rewards) ** 2).mean().sqrt())}


def train_value(dataset: ValueDataset, d: int, epochs: int = 50, lr: float = 1e-3, batch_size: int = 64,
                seed: int = 0, hidden: int | None = None, layers: int = 2, holdout: float = 0.2,
                weight_decay: float = 0.0) -> tuple[ValueMLP, dict]:
    """Train a :class:`ValueMLP` on ``dataset`` with Adam; deterministic for a seed.

    Args:
        dataset: from :func:`collect_training_data`.
        d: pre-logit dimension (must match the dataset).
        epochs, lr, batch_size: Adam on the TD loss (official code: 100 epochs, lr 1e-4, batch
            512 on ~10^5 responses; smaller data wants a larger lr).
        seed: fixes the initialisation, the held-out split and the batch order.
        hidden, layers: see :class:`ValueMLP`.
        holdout: share of the *prompts* held out for evaluation (whole prompts, so the held-out
            correlation measures generalisation to new prompts); 0 disables it.
        weight_decay: Adam's L2 penalty.
    Returns:
        ``(mlp, metrics)``; the MLP is in eval mode on the CPU. metrics: ``loss_history`` (mean
        batch loss per epoch), ``first_loss``, ``final_loss``, ``train_seconds``, sizes, and
        for the train and held-out parts the loss, the RMSE and the Pearson correlation with the
        reward of V at the last token (``*_corr_last``) and at the first token (``*_corr_first``).
        The first pre-logit depends only on the prompt, so ``*_corr_first`` is NaN when that part
        holds a single prompt.
    """
    check_number("d", d, low=1, integer=True)
    if dataset.prelogits.dim() != 3 or dataset.prelogits.shape[2] != d:
        raise ParameterError(f"dataset pre-logits must have shape (N, T, d={d}), got {tuple(dataset.prelogits.shape)}")
    check_number("epochs", epochs, low=1, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("seed", seed, low=0, integer=True)
    check_number("holdout", holdout, low=0, high=1, high_open=True)
    check_number("weight_decay", weight_decay, low=0)

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.unique(dataset.prompt_index)
    n_hold = 0
    if holdout > 0:
        if len(prompts) < 2:
            raise ParameterError(f"holdout > 0 needs at least 2 prompts in the dataset, got {len(prompts)}; "
                                 "use holdout=0 or collect more prompts")
        n_hold = min(len(prompts) - 1, max(1, round(holdout * len(prompts))))
    held = prompts[torch.randperm(len(prompts), generator=gen)[:n_hold]]
    is_held = torch.isin(dataset.prompt_index, held)
    train = dataset.subset(torch.nonzero(~is_held).squeeze(1))
    test = dataset.subset(torch.nonzero(is_held).squeeze(1)) if n_hold else None

    # Seed the initialisation without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = ValueMLP(d, hidden, layers)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    t0 = time.perf_counter()
    mlp.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(train), batch_size):
            b = perm[start:start + batch_size]
            loss = value_loss(mlp, train.prelogits[b], train.lengths[b], train.rewards[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        history.append(total / batches)
    train_seconds = time.perf_counter() - t0
    mlp.eval()

    metrics: dict = {"loss_history": history, "first_loss": history[0], "final_loss": history[-1],
                     "train_seconds": train_seconds, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "hidden": mlp.hidden, "layers": layers, "n_train": len(train),
                     "n_heldout": 0 if test is None else len(test), "n_heldout_prompts": n_hold,
                     "reward_std": float(dataset.rewards.std()) if len(dataset) > 1 else float("nan")}
    metrics.update({f"train_{k}": v for k, v in _evaluate(mlp, train).items()})
    held_metrics = _evaluate(mlp, test) if test is not None else dict.fromkeys(
        ("loss", "corr_last", "corr_first", "rmse_last"), float("nan"))
    metrics.update({f"heldout_{k}": v for k, v in held_metrics.items()})
    return mlp, metrics


# ---- decoding ---------------------------------------------------------------------------------

def value_ascent(value_fn: ValueFn, z: torch.Tensor, step_size: float, n_steps: int) -> torch.Tensor:
    """``n_steps`` of z <- z + step_size * grad V(z), row by row; returns z' with the dtype of z.

    z: (b, d). The ascent runs in float32 on a detached copy with gradients enabled, so it works
    inside the sampler's ``torch.no_grad``; gradients w.r.t. the value function's parameters are
    not accumulated. With n_steps = 0, z comes back unchanged (through the same casts).
    """
    check_number("step_size", step_size, low=0)
    check_number("n_steps", n_steps, low=0, integer=True)
    x = z.detach().to(torch.float32).clone()
    with torch.enable_grad():
        for _ in range(n_steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(value_fn(x).sum(), x)
            x = (x + step_size * grad).detach()
    return x.to(z.dtype)


def recontrol_generate_many(sampler: PrelogitSampler, prompts: Sequence, value_fn: ValueFn, step_size: float = 0.5,
                            n_steps: int = 30, max_new_tokens: int | None = None) -> list[Generation]:
    """One greedy response per prompt with RE-Control's gradient ascent on every generated token's
    pre-logit, all prompts in one batched run (the ascent acts on each row separately).

    Args:
        sampler: the pre-logit sampler of the base model.
        prompts: templated prompt texts or token ids.
        value_fn: V, pre-logits (b, d) float32 -> (b,), e.g. a trained :class:`ValueMLP` (put it
            on the sampler's device).
        step_size: gradient-ascent step (official code: 0.5-1.0), >= 0.
        n_steps: ascent steps per token (official code: 30), >= 0; 0 gives plain greedy decoding.
        max_new_tokens: overrides the sampler's.
    Returns:
        One :class:`Generation` per prompt; its ``meta`` holds ``value_grad_steps`` (total gradient
        evaluations of V for that prompt), and ``value_before`` / ``value_after`` (per generated
        token, V at the original and at the moved pre-logit). Its ``kl`` (1,) float64 is the KL of
        the response against the base model in nats (the sampler's ``record_kl``): decoding is
        greedy, so RE-Control's policy is the point mass on its response y, and since the ascent
        only changes which token is chosen, never the KV cache, the KL is exactly
        -log pi_ref(y | x) = -sum_t log p_t(y_t), p_t the base model's sampling distribution
        (``sampler.next_token_probs``, at the sampler's temperature, top-k and top-p) at the
        unmoved pre-logit; +inf if a chosen token lies outside p_t's top-k or top-p.
    """
    check_number("step_size", step_size, low=0)
    check_number("n_steps", n_steps, low=0, integer=True)
    if isinstance(value_fn, nn.Module):
        value_fn.eval()
    before: list[list[float]] = [[] for _ in prompts]
    after: list[list[float]] = [[] for _ in prompts]

    def fn(z: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        moved = value_ascent(value_fn, z, step_size, n_steps)
        with torch.no_grad():
            v0, v1 = value_fn(z.float()).tolist(), value_fn(moved.float()).tolist()
        for i, r in enumerate(rows.tolist()):  # one row per prompt: row index = prompt index
            before[r].append(v0[i])
            after[r].append(v1[i])
        return moved

    gens = sampler.generate_many(list(prompts), [1] * len(prompts), prelogit_fn=fn, decode="greedy",
                                 max_new_tokens=max_new_tokens, record_kl=True)
    for g, b, a in zip(gens, before, after):
        g.meta.update({"value_grad_steps": n_steps * len(b), "value_before": b, "value_after": a,
                       "step_size": step_size, "n_steps": n_steps})
    return gens


def ascent_deviation(sampler: PrelogitSampler, value_fn: ValueFn, prompt: str | torch.Tensor, tokens: torch.Tensor,
                     step_size: float, n_steps: int) -> tuple[float, float]:
    """Replay prompt + response through the LM once and compare, token by token, the head's argmax at
    the pre-logit with its argmax after the ascent: returns (share of steps the ascent changed,
    share of steps where the replayed ascent reproduces the generated token). ``tokens``: (T,) the response."""
    ids = torch.cat([sampler.encode(prompt), tokens.view(1, -1).to(sampler.device)], dim=1)
    seen = []
    hook = sampler.head.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            sampler.model(input_ids=ids[:, :-1])
    finally:
        hook.remove()
    # the pre-logit that chose generated token t, where the value function is (a model spread over GPUs
    # by device_map: auto hands the head its input on the last layer's device)
    z = seen[0][-len(tokens):].to(sampler.device)
    moved = value_ascent(value_fn, z, step_size, n_steps)
    with torch.no_grad():
        plain, steered = sampler.head(z).argmax(-1).cpu(), sampler.head(moved).argmax(-1).cpu()
    return float((plain != steered).float().mean()), float((steered == tokens).float().mean())


def recontrol_records(sampler: PrelogitSampler, reward: Any, judges: Mapping[str, Any], rows: list[dict],
                      value_fn: ValueFn, step_size: float, n_steps: int) -> list[dict]:
    """The recontrol stage's records: RE-Control on the prompt ``rows`` (``load_prompts`` rows) in one batched
    run, then plain greedy decoding (``n_steps = 0``) as the reference, one record per prompt, in prompt order.

    Each record holds the steered response with its reward (``reward``) and the held-out judges' scores
    (``judges``), its tokens, its deviation from greedy and the replay's agreement
    (:func:`ascent_deviation`), the value before and after the ascent at every token, the sequence KL to
    the base model (nats) and the cost (the batched run's time shared out by tokens), and the greedy
    response with its reward, next to ``prompt_id`` and ``prompt``. Under ``accelerate launch`` each
    process runs its share of the prompts and every process gets all records back
    (:func:`prelogit.shard.run_sharded`).
    """
    def record(p: dict, g: Generation, base: Generation, generation_seconds: float) -> dict:
        meter = CostMeter()
        meter.add_generation(g)
        meter.time_generation_s = generation_seconds
        text, greedy = g.texts[0], base.texts[0]
        r_rc, r_greedy = reward.score([p["text"]] * 2, [text, greedy]).tolist()
        scores = judge_all(judges, [p["text"]], [text])
        tokens = g.tokens[0, : g.lengths[0]]
        deviation, replay = ascent_deviation(sampler, value_fn, p["prompt"], tokens, step_size, n_steps)
        before, after = g.meta["value_before"], g.meta["value_after"]
        kl = cast(torch.Tensor, g.kl)  # recontrol_generate_many records every row's sequence KL
        return {
            "prompt_id": p["id"], "prompt": p["text"], "response": text, "reward": r_rc,
            "judges": {j: v[0] for j, v in scores.items()},
            "tokens": tokens.tolist(), "finished": bool(g.finished[0]),
            "deviation_rate": deviation, "replay_agreement": replay,
            "forward_calls": meter.forward_calls, "reward_calls": meter.reward_calls,
            "value_grad_steps": g.meta["value_grad_steps"], "cost": meter.as_dict(), "kl_sequence": float(kl[0]),
            "value_before": before, "value_after": after,
            "value_gain": (sum(after) - sum(before)) / len(before),
            "greedy_response": greedy, "greedy_reward": r_greedy, "differs_from_greedy": text != greedy,
            "config": {"step_size": step_size, "n_steps": n_steps, "max_new_tokens": sampler.max_new_tokens},
        }

    def run(share: list[dict]) -> list[dict]:
        t_gen = time.perf_counter()
        steered = recontrol_generate_many(sampler, [p["prompt"] for p in share], value_fn, step_size=step_size,
                                          n_steps=n_steps)
        gen_seconds = time.perf_counter() - t_gen
        plain = recontrol_generate_many(sampler, [p["prompt"] for p in share], value_fn, step_size=step_size, n_steps=0)
        total_tokens = sum(g.new_tokens for g in steered)
        # the batched run's time, shared out by tokens
        return [record(p, g, base, gen_seconds * g.new_tokens / total_tokens) for p, g, base in zip(share, steered, plain)]

    return run_sharded(rows, run)


def recontrol_generate(sampler: PrelogitSampler, prompt: str | Sequence[int] | torch.Tensor, value_fn: ValueFn,
                       step_size: float = 0.5, n_steps: int = 30, max_new_tokens: int | None = None) -> Generation:
    """One greedy RE-Control response: :func:`recontrol_generate_many` with a single prompt."""
    return recontrol_generate_many(sampler, [prompt], value_fn, step_size, n_steps, max_new_tokens)[0]


# ---- persistence ------------------------------------------------------------------------------

def save_value(mlp: ValueMLP, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the MLP's weights and shape as safetensors, atomically; ``metadata`` values become strings."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in mlp.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"kind": "recontrol-value-mlp", "d": str(mlp.d), "hidden": str(mlp.hidden), "layers": str(mlp.layers)})
    return write_safetensors(path, tensors, meta)


def load_value(path: str | os.PathLike, device: str = "cpu") -> ValueMLP:
    """Read a :class:`ValueMLP` written by :func:`save_value`; in eval mode on ``device``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"value function {path} does not exist; train it first (train_value, save_value)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != "recontrol-value-mlp":
        raise ParameterError(f"{path} is not a RE-Control value function (metadata kind {meta.get('kind')!r})")
    mlp = ValueMLP(int(meta["d"]), int(meta["hidden"]), int(meta["layers"]))
    mlp.load_state_dict(load_file(str(path)))
    return mlp.to(device).eval()

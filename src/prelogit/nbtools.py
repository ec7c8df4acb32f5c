"""Executed notebooks are pipeline outputs; this strips what changes on every run for no reason.

Papermill stamps each cell and the notebook with start/end times and durations; those would make
every re-run a diff. ``python -m prelogit.nbtools PATH...`` removes them in place (atomically).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

from .io import atomic_path


def scrub(path: str | Path) -> None:
    """Remove papermill's timestamps and durations (notebook and cells) and execution timing."""
    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    for key in ("start_time", "end_time", "duration", "environment_variables"):
        pm.pop(key, None)
    for cell in nb.cells:
        cpm = cell.metadata.get("papermill", {})
        for key in ("start_time", "end_time", "duration"):
            cpm.pop(key, None)
        cell.metadata.pop("execution", None)
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        scrub(p)

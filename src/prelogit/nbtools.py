"""Executed notebooks are pipeline outputs; this strips what changes on every run for no reason.

Papermill stamps each cell and the notebook with start/end times and durations, and a progress bar
shown as a Jupyter widget carries a random id; those would make every re-run a diff.
``python -m prelogit.nbtools PATH...`` removes them in place (atomically).
:func:`relocate` rewrites the staging folder a stage ran in (``prelogit.stage``) to the folder its
outputs were moved to, so the committed notebook names where its files are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nbformat

from .io import atomic_path, save_figure


#: The MIME type of a Jupyter widget's output (what tqdm.auto shows in a notebook).
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def scrub(path: str | Path) -> None:
    """Remove papermill's timestamps and durations (notebook and cells) and execution timing.

    The injected parameters cell also gets a fixed id instead of papermill's random one, each
    cell's consecutive outputs of one stream are merged (where the kernel split them is timing), and
    Jupyter widget outputs are dropped with the notebook's widget state. The only widgets a stage
    shows are tqdm progress bars, and whether one appears is the machine's state, not the run's:
    transformers' GGUF conversion draws one when the embedded model is converted on first use (a cold
    model cache) and none when it is found converted. Each widget also carries a random model id.
    """
    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    for key in ("start_time", "end_time", "duration", "environment_variables"):
        pm.pop(key, None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams([o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})])
        cpm = cell.metadata.get("papermill", {})
        for key in ("start_time", "end_time", "duration"):
            cpm.pop(key, None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill gives the cell a random id on every run
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))


def _coalesce_streams(outputs: list) -> list:
    """Merge consecutive outputs of the same stream (stdout, stderr) into one.

    The kernel splits a cell's printing into stream outputs wherever it happened to flush, which
    depends on timing; merged, two identical runs give identical notebooks (nbconvert's
    ``coalesce_streams`` does the same).
    """
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(out)
    return merged


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


def show_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as the PNG ``path`` and display that very file in the notebook.

    The executed notebook then carries the saved bytes as its ``image/png`` output (a test checks
    it), whatever the matplotlib backend (the stages use Agg, which shows nothing by itself); the
    figure is closed so that it is not shown twice.
    """
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    path = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    display(Image(filename=str(path)))
    return path


def show_markdown(text: str, path: str | Path | None = None) -> str:
    """Display ``text`` as rendered Markdown (a table renders as a table) and, given ``path``,
    write it there too (atomically)."""
    from IPython.display import Markdown, display

    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_text(text if text.endswith("\n") else text + "\n")
    display(Markdown(text))
    return text


if __name__ == "__main__":
    for p in sys.argv[1:]:
        scrub(p)

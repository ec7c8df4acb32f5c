"""Run one pipeline stage so that its outputs change all at once, or not at all.

``python -m prelogit.stage STAGE [--params params.yaml]`` is every DVC stage's command:

1. validate ``params.yaml`` for the stage (:func:`prelogit.params.check_stage`: values, prompt counts, model sources, device); a bad value
   prints ``error: <message>`` and exits 2 before anything else starts;
2. empty the staging folder ``results/.staging/STAGE/``, write the stage's flat parameters there
   and run ``notebooks/STAGE.ipynb`` with papermill, its ``results_dir`` pointing at the staging
   folder, the executed notebook written there too;
3. scrub papermill's timestamps from the executed notebook and rewrite the staging path in it to
   the final one (``results/STAGE``), where its files are about to be;
4. only then move every staged file into ``results/STAGE/`` (``os.replace``) and remove staging.

A run that fails or is killed before step 4 leaves ``results/STAGE/`` byte-identical. A failed
notebook stays in staging for inspection; the last line printed is the error itself, e.g.
``error: stage aisp failed in cell 5: ValueError: ...``, and the exit code is 1. A killed
``dvc repro`` needs no cleanup: the next run empties staging, and DVC drops the lock entries of
processes that no longer exist.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import yaml

from . import params
from .checks import ParameterError
from .nbtools import relocate, scrub

STAGING = Path("results/.staging")


def staging_dir(stage: str) -> Path:
    """The fixed folder where ``stage`` writes before its outputs are moved into place."""
    return STAGING / stage


def _move_all(src: Path, dst: Path, last: Path) -> None:
    """Move every file under ``src`` into ``dst`` (same relative paths), ``last`` at the end."""
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p == last, str(p)))
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)


def run_stage(stage: str, params_path: str | Path = "params.yaml") -> int:
    """Validate, execute in staging, then publish ``results/STAGE``; return the exit code."""
    try:
        flat = params.check_stage(stage, params.load(params_path))
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import papermill
    from papermill.exceptions import PapermillExecutionError, strip_color

    final = Path(flat["results_dir"])
    staging = staging_dir(stage)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "params.yaml").write_text(yaml.safe_dump(flat, sort_keys=True))
    executed = staging / f"{stage}.ipynb"

    injected = dict(sorted({**flat, "results_dir": str(staging)}.items()))  # sorted, as in params.yaml
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        papermill.execute_notebook(f"notebooks/{stage}.ipynb", str(executed), parameters=injected, cwd=".",
                                   log_output=True, progress_bar=False)
    except PapermillExecutionError as err:
        message = " ".join(str(err.evalue).split())
        cell = err.exec_count if err.exec_count is not None else err.cell_index
        print(strip_color("\n".join(err.traceback)), file=sys.stderr)
        print(f"results/{stage}/ is unchanged; the failed notebook is kept at {executed}", file=sys.stderr)
        print(f"error: stage {stage} failed in cell {cell}: {err.ename}: {message}", file=sys.stderr, flush=True)
        return 1

    scrub(executed)
    relocate(executed, str(staging), str(final))
    _move_all(staging, final, last=executed)
    shutil.rmtree(staging)
    with contextlib.suppress(OSError):  # only when no other stage's staging folder is left there
        STAGING.rmdir()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m prelogit.stage STAGE [--params params.yaml]``."""
    ap = argparse.ArgumentParser(description="Run one pipeline stage: validate params, execute its notebook "
                                             "in results/.staging/STAGE, then move the outputs into results/STAGE")
    ap.add_argument("stage", choices=sorted(params.STAGES))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    return run_stage(args.stage, args.params)


if __name__ == "__main__":
    sys.exit(main())

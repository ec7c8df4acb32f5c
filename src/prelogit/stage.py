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

With ``launch.launcher: accelerate`` (generating stages only, :mod:`prelogit.launch`) step 2 runs
under ``accelerate launch --num_processes P``: every process executes the notebook into
``results/.staging/STAGE/rankR``, the notebook shares its prompts out and gathers the records
(:mod:`prelogit.shard`), and step 4 publishes rank 0's folder once all processes have exited
cleanly.

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
import subprocess
import sys
from pathlib import Path

import yaml

from . import launch as launcher
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


def _execute(stage: str, flat: dict, staging: Path) -> int:
    """Run the stage's notebook into ``staging`` (parameters, executed notebook, outputs); 0 on success.

    On failure the traceback and then the one-line error are printed and 1 is returned; the
    failed notebook stays in ``staging``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError, strip_color

    final = Path(flat["results_dir"])
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
    return 0


def _publish(stage: str, staging: Path, final: Path) -> None:
    """Move the staged outputs into ``final`` (the executed notebook last) and remove staging."""
    _move_all(staging, final, last=staging / f"{stage}.ipynb")
    shutil.rmtree(staging_dir(stage), ignore_errors=True)
    with contextlib.suppress(OSError):  # only when no other stage's staging folder is left there
        STAGING.rmdir()


def rank_dir(stage: str, rank: int) -> Path:
    """Where process ``rank`` of a sharded stage writes: every process executes the notebook, and
    the main process's folder (rank 0) is the one published."""
    return staging_dir(stage) / f"rank{rank}"


def run_stage(stage: str, params_path: str | Path = "params.yaml", worker: bool = False) -> int:
    """Validate, execute in staging, then publish ``results/STAGE``; return the exit code.

    A generating stage with ``launch.launcher: accelerate`` runs as ``launch.num_processes``
    workers under ``accelerate launch`` (this same command with ``worker=True``), each executing
    the notebook into its own :func:`rank_dir`; their notebooks share the prompts out
    (:func:`prelogit.shard.run_sharded`). Only when every worker has exited cleanly is the main
    process's folder published, once; otherwise ``results/STAGE`` is unchanged.
    """
    try:
        all_params = params.load(params_path)
        flat = params.check_stage(stage, all_params)
        # check_stage has checked the launch section of a generating stage (prelogit.launch.check)
        launch = all_params["launch"] if stage in params.SHARDED_STAGES else {"launcher": "python"}
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    final = Path(flat["results_dir"])
    if worker:  # one of the launched processes: execute only; the launching process publishes
        return _execute(stage, flat, rank_dir(stage, launcher.worker_rank() or 0))
    if launch["launcher"] == "python":
        staging = staging_dir(stage)
        code = _execute(stage, flat, staging)
        if code == 0:
            _publish(stage, staging, final)
        return code

    shutil.rmtree(staging_dir(stage), ignore_errors=True)
    cmd = launcher.accelerate_command(launch, [stage, "--params", str(params_path), "--worker"],
                                      all_params["model"]["device"])
    print(" ".join(cmd), file=sys.stderr, flush=True)
    code = subprocess.call(cmd)
    main_dir = rank_dir(stage, 0)
    if code != 0 or not (main_dir / f"{stage}.ipynb").exists():
        print(f"results/{stage}/ is unchanged; the processes' notebooks are kept under {staging_dir(stage)}",
              file=sys.stderr)
        print(f"error: stage {stage} failed under accelerate launch with {launch['num_processes']} process(es) "
              f"(exit code {code}); its first error is printed above", file=sys.stderr, flush=True)
        return 1
    _publish(stage, main_dir, final)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m prelogit.stage STAGE [--params params.yaml]``."""
    ap = argparse.ArgumentParser(description="Run one pipeline stage: validate params, execute its notebook "
                                             "in results/.staging/STAGE, then move the outputs into results/STAGE")
    ap.add_argument("stage", choices=sorted(params.STAGES))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--worker", action="store_true",
                    help="internal: one of the processes accelerate launch starts (execute, do not publish)")
    args = ap.parse_args(argv)
    return run_stage(args.stage, args.params, args.worker)


if __name__ == "__main__":
    sys.exit(main())

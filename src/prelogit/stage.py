"""Run one pipeline stage so that its outputs change all at once, or not at all.

``python -m prelogit.stage STAGE [--params params.yaml]`` is every DVC stage's command:

1. validate ``params.yaml`` for the stage (:func:`prelogit.preflight.check_stage`: values, prompt counts, model sources, device); a bad value
   prints ``error: <message>`` and exits 2 before anything else starts;
2. empty the staging folder ``results/.staging/STAGE/``, write the parameters papermill injects there
   and run ``notebooks/STAGE.ipynb`` with papermill, its ``results_dir`` pointing at the staging
   folder, the executed notebook written there too;
3. scrub papermill's timestamps from the executed notebook and rewrite the staging path in it to
   the final one (``results/STAGE``), where its files are about to be;
4. only then publish: write the journal ``results/.staging/STAGE/PUBLISHING`` (the files to
   move, written to a temporary file and renamed, so it exists whole or not at all), move every
   staged file into ``results/STAGE/`` (``os.replace``), then remove staging, the journal last.

With ``launch.launcher: accelerate`` (generating stages only, :mod:`prelogit.launch`) step 2 runs
under ``accelerate launch --num_processes P``: every process executes the notebook into
``results/.staging/STAGE/rankR``, the notebook shares its prompts out and gathers the records
(:mod:`prelogit.shard`), and step 4 publishes rank 0's folder once all processes have exited
cleanly.

A run that fails or is killed before the journal exists leaves ``results/STAGE/`` byte-identical.
A failed notebook stays in staging for inspection; the last line printed is the error itself, e.g.
``error: stage aisp failed in cell 5: ValueError: ...``, and the exit code is 1. A killed
``dvc repro`` needs no cleanup: the next run completes a journalled publication or empties
staging, and DVC drops the lock entries of processes that no longer exist.

Publication is all or nothing. A kill between two of step 4's renames would leave
``results/STAGE/`` a mix of old and new files; instead, once the journal exists the publication is
rolled *forward*: every later run of the wrapper (any stage, before it validates anything) and
``python -m prelogit.stage --recover [STAGE]`` finish the moves the journal lists (each file is
either still in staging or already in place, ``os.replace`` being atomic), print what they did and
remove staging. A staging folder without a journal is an incomplete run: the next run discards it
(``--recover`` leaves it for inspection). ``results/STAGE/`` never receives a temporary file: the
journal's own is written in staging, and ``io.atomic_path``'s (``.NAME.XXXXXXXX.tmp``) are neither
published nor left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from . import launch as launcher
from . import params, preflight
from .checks import ParameterError

STAGING = Path("results/.staging")

#: The journal's name inside a stage's staging folder: it exists exactly while a publication that
#: must be completed is under way (see :func:`_publish`).
MARKER = "PUBLISHING"

#: Test-only fault injection (see :class:`_Renamer`).
FAULT_ENV = "PRELOGIT_FAULT_AFTER_REPLACES"


class PublishError(RuntimeError):
    """A journal that cannot be completed (a file it lists is in neither place)."""


def staging_dir(stage: str) -> Path:
    """The fixed folder where ``stage`` writes before its outputs are moved into place."""
    return STAGING / stage


def marker_path(stage: str) -> Path:
    """The journal of ``stage``'s publication: present only between 'staging complete' and 'done'."""
    return staging_dir(stage) / MARKER


def _is_temp(path: Path) -> bool:
    """A temporary file (``io.atomic_path`` names them ``.NAME.XXXXXXXX.tmp``), never an output.

    Only a killed writer leaves one behind. A killed kernel fails its notebook, which is then not
    published, but a sharded rank or a notebook that catches the error can still finish with one in
    its folder, and a notebook run by hand into ``results/STAGE`` can leave one there.
    """
    return path.name.startswith(".") and path.name.endswith(".tmp")


class _Renamer:
    """``os.replace`` with a test-only fault hook, counting every rename of one publication.

    TEST ONLY: with ``PRELOGIT_FAULT_AFTER_REPLACES=N`` in the environment the process calls
    ``os._exit(137)`` (as if SIGKILLed: no cleanup, no ``finally``) right after the N-th rename.
    The journal's own rename is the first, so N = 0 dies with the journal's temporary file
    written but not yet renamed (no journal: the publication never started), N = 1 with the
    journal in place and nothing moved, N = 1 + k after k files have moved. Recovery, which has
    no journal to write, counts its own file moves from 1, so a kill during recovery can be
    tested too. Never set it outside tests.
    """

    def __init__(self) -> None:
        value = os.environ.get(FAULT_ENV, "")
        self.kill_after = int(value) if value.strip() else None
        self.count = 0

    def checkpoint(self) -> None:
        """Die here if the fault hook asks for a kill after ``self.count`` renames."""
        if self.kill_after is not None and self.count == self.kill_after:
            sys.stderr.flush()
            os._exit(137)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        self.count += 1
        self.checkpoint()


def _fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable: a kill needs no fsync, a power cut does (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: How often a stage starts its notebook's kernel when the kernel dies before answering. Seen once, in
#: rank 1 of a two-process accelerate run in CI (not reproduced in four reruns here); two kernels
#: starting at the same moment on one machine can, for one, race for the same free ports.
KERNEL_STARTS = 3
KERNEL_DIED = "Kernel died before replying to kernel_info"


class _DeclaredElsewhere(logging.Filter):
    """Drops papermill's "Passed unknown parameter: NAME" for the names a stage injects by design.

    A notebook's parameters cell sets only its own section; the shared sections, the paths and the
    results folder are injected all the same and read by :func:`prelogit.params.open_notebook`, so
    papermill's warning about them says nothing. Any other unknown name still warns.
    """

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.expected = {f"Passed unknown parameter: {name}" for name in names}

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.expected


def _execute(stage: str, parameters: dict, staging: Path) -> int:
    """Run the stage's notebook into ``staging`` (parameters, executed notebook, outputs); 0 on success.

    On failure the traceback and then the one-line error are printed and 1 is returned; the
    failed notebook stays in ``staging``.
    """
    # imported here, not at the top: nbformat alone takes seconds, and --recover needs none of it
    import papermill
    from papermill.exceptions import PapermillExecutionError, strip_color

    from .nbtools import relocate, scrub

    final = Path(parameters["results_dir"])
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "params.yaml").write_text(yaml.safe_dump(parameters, sort_keys=True))
    executed = staging / f"{stage}.ipynb"
    injected = dict(sorted({**parameters, "results_dir": str(staging)}.items()))  # sorted, as in params.yaml
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet = _DeclaredElsewhere(set(injected) - {params.stages()[stage].sections[0]})
    logging.getLogger("papermill").addFilter(quiet)
    try:
        for attempt in range(1, KERNEL_STARTS + 1):
            try:
                papermill.execute_notebook(f"notebooks/{stage}.ipynb", str(executed), parameters=injected, cwd=".",
                                           log_output=True, progress_bar=False)
                break
            except RuntimeError as err:
                # The kernel exited before it answered, so no cell ran: starting another one is safe.
                if KERNEL_DIED not in str(err) or attempt == KERNEL_STARTS:
                    raise
                print(f"the notebook's kernel died while starting (attempt {attempt} of {KERNEL_STARTS}); "
                      "starting another", file=sys.stderr, flush=True)
    except PapermillExecutionError as err:
        message = " ".join(str(err.evalue).split())
        cell = err.exec_count if err.exec_count is not None else err.cell_index
        print(strip_color("\n".join(err.traceback)), file=sys.stderr)
        print(f"results/{stage}/ is unchanged; the failed notebook is kept at {executed}", file=sys.stderr)
        print(f"error: stage {stage} failed in cell {cell}: {err.ename}: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        logging.getLogger("papermill").removeFilter(quiet)
    scrub(executed)
    relocate(executed, str(staging), str(final))
    return 0


def _publish(stage: str, staging: Path, final: Path) -> None:
    """Move the staged outputs into ``final`` all at once, as far as a kill can tell.

    ``staging`` is :func:`staging_dir` (one process) or rank 0's folder inside it (sharded); the
    journal goes into :func:`staging_dir` either way. Order: the journal (temporary file, fsync,
    rename), then one ``os.replace`` per file (the executed notebook last, so that a folder with
    the new notebook has every new output), then staging's removal, the journal last. Killed
    before the journal's rename: ``final`` is untouched and the staging folder is discarded by the
    next run. Killed after it: the next run (or ``--recover``) completes the moves.
    See :class:`_Renamer` for the test-only fault hook ``PRELOGIT_FAULT_AFTER_REPLACES``.
    """
    marker = marker_path(stage)
    files = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*")
                    if p.is_file() and p != marker and not _is_temp(p)),
                   key=lambda rel: (rel == f"{stage}.ipynb", rel))
    journal = {"stage": stage, "from": staging.as_posix(), "to": final.as_posix(), "files": files}
    renamer = _Renamer()
    # The journal's temporary file lives in staging, never in final; renaming it is what commits.
    tmp = marker.with_name(f".{MARKER}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(journal, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    renamer.checkpoint()
    renamer.replace(tmp, marker)
    _fsync_dir(marker.parent)
    _complete(journal, renamer)


def _complete(journal: dict, renamer: _Renamer) -> int:
    """Finish the moves ``journal`` lists, then remove staging; return how many files moved now.

    Idempotent: a file no longer in staging has already been renamed into place (a rename is
    atomic), so it is skipped. Raises :class:`PublishError` if a listed file is in neither place.
    """
    src, dst = Path(journal["from"]), Path(journal["to"])
    moved, missing = 0, []
    for rel in journal["files"]:
        source, target = src / rel, dst / rel
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                renamer.replace(source, target)
                moved += 1
                continue
            except FileNotFoundError:  # another wrapper completing the same journal got there first
                pass
        if not target.is_file():
            missing.append(rel)
    if missing:
        raise PublishError(f"cannot complete the publication of {dst} journalled in {marker_path(journal['stage'])}: "
                           f"{', '.join(missing)} in neither {src} nor {dst}; remove {staging_dir(journal['stage'])} "
                           f"and run the stage again")
    if dst.is_dir():
        for stray in [p for p in dst.rglob("*") if p.is_file() and _is_temp(p)]:  # from a killed writer
            stray.unlink(missing_ok=True)
    for folder in sorted({(dst / rel).parent for rel in journal["files"]}):
        _fsync_dir(folder)  # the renames are durable before the journal that vouches for them goes
    _discard(journal["stage"])
    return moved


def _discard(stage: str) -> None:
    """Remove ``stage``'s staging folder, its journal last (a kill in between redoes only this)."""
    root, marker = staging_dir(stage), marker_path(stage)
    if root.is_dir():
        for child in root.iterdir():
            if child == marker:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        root.rmdir()
    with contextlib.suppress(OSError):  # only when no other stage's staging folder is left there
        STAGING.rmdir()


def recover(stage: str) -> bool:
    """Complete ``stage``'s interrupted publication if its journal exists; True if there was one.

    Prints what it did to stderr. A staging folder without a journal is left alone here (the next
    run of the stage discards it; until then a failed notebook stays there for inspection).
    """
    marker = marker_path(stage)
    if not marker.is_file():
        return False
    try:
        journal = json.loads(marker.read_text())
    except (OSError, ValueError) as err:  # cannot happen to a journal written by _publish (renamed whole)
        raise PublishError(f"unreadable publication journal {marker}: {err}; remove {staging_dir(stage)} "
                           f"and run the stage again") from err
    moved = _complete(journal, _Renamer())
    print(f"recovered: completed the interrupted publication of {journal['to']} "
          f"({moved} of {len(journal['files'])} files moved now, the rest were already in place)",
          file=sys.stderr, flush=True)
    return True


def recover_all() -> list[str]:
    """Complete every stage's interrupted publication (see :func:`recover`); the stages recovered.

    Run before any stage starts, so that no stage ever reads a half-published one.
    """
    if not STAGING.is_dir():
        return []
    return [d.name for d in sorted(STAGING.iterdir()) if d.is_dir() and recover(d.name)]


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

    Before anything else, a non-worker run completes every interrupted publication
    (:func:`recover_all`): the parameter checks already read earlier stages' outputs.
    """
    if not worker:  # the workers run while the launching process waits: it has recovered already
        try:
            recover_all()
        except PublishError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
    try:
        all_params = params.load(params_path)
        parameters = preflight.check_stage(stage, all_params)
        # check_stage has checked the launch section of a generating stage (prelogit.launch.check)
        launch = all_params["launch"] if params.stages()[stage].sharded else {"launcher": "python"}
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    final = Path(parameters["results_dir"])
    if worker:  # one of the launched processes: execute only; the launching process publishes
        return _execute(stage, parameters, rank_dir(stage, launcher.worker_rank() or 0))
    if launch["launcher"] == "python":
        staging = staging_dir(stage)
        code = _execute(stage, parameters, staging)
        return _published(stage, staging, final) if code == 0 else code

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
    return _published(stage, main_dir, final)


def _published(stage: str, staging: Path, final: Path) -> int:
    """:func:`_publish`, as an exit code: 0, or 1 with the one-line error printed last."""
    try:
        _publish(stage, staging, final)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m prelogit.stage STAGE [--params params.yaml]`` or ``--recover [STAGE]``."""
    ap = argparse.ArgumentParser(description="Run one pipeline stage: validate params, execute its notebook "
                                             "in results/.staging/STAGE, then move the outputs into results/STAGE")
    try:
        known = sorted(params.stages())
    except ParameterError as err:  # no dvc.yaml here or above, or a malformed one
        print(f"error: {err}", file=sys.stderr)
        return 2
    ap.add_argument("stage", nargs="?", choices=known)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--worker", action="store_true",
                    help="internal: one of the processes accelerate launch starts (execute, do not publish)")
    ap.add_argument("--recover", action="store_true",
                    help="only complete the interrupted publication of STAGE (default: of every stage), then exit")
    args = ap.parse_args(argv)
    if args.recover:
        try:
            done = recover(args.stage) if args.stage else bool(recover_all())
        except PublishError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        if not done:
            print("nothing to recover: no interrupted publication", file=sys.stderr)
        return 0
    if args.stage is None:
        ap.error("the stage is required (or --recover)")
    return run_stage(args.stage, args.params, args.worker)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m prelogit.stage``: outputs appear all at once after success, never after a failure.

These run the wrapper on a two-cell stand-in for the figures notebook in a temporary folder (a
real kernel, seconds); tests/test_pipeline.py runs the real stages under DVC. The publication
tests kill ``_publish`` after every one of its renames in turn (the test-only hook
``PRELOGIT_FAULT_AFTER_REPLACES``), on a staging folder made by hand (no notebook, no model).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from prelogit import stage
from prelogit.io import is_timing_key, strip_timing

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"figures": {"n_boot": 200, "ci_level": 0.9, "seed": 0, "power": 0.8, "verdict_N": 32, "margin_sd": 0.2}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with dvc.yaml (the repository's: it declares the stages), params.yaml,
    notebooks/figures.ipynb (writes out.txt) and previous results."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FIGURES))
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results" / "figures").mkdir(parents=True)
    (tmp_path / "results" / "figures" / "out.txt").write_text("previous\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('results_dir = "results/_smoke/figures"\nfigures = {"n_boot": 100}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


def test_success_moves_every_output_into_place_and_removes_staging(project):
    _notebook(project / "notebooks" / "figures.ipynb",
              "from pathlib import Path\nPath(results_dir, 'out.txt').write_text(f'{results_dir} {figures[\"n_boot\"]}\\n')")
    assert stage.main(["figures"]) == 0
    out = project / "results" / "figures"
    assert (out / "out.txt").read_text() == "results/.staging/figures 200\n"  # the notebook ran in staging
    assert yaml.safe_load((out / "params.yaml").read_text())["results_dir"] == "results/figures"
    executed = (out / "figures.ipynb").read_text()
    assert "start_time" not in executed and ".staging" not in executed and '"id": "injected-parameters"' in executed
    assert not (project / "results" / ".staging").exists()


def test_papermill_is_quiet_about_the_names_a_stage_injects_by_design(project, caplog):
    """A parameters cell sets only the stage's own section; the paths and results folder are injected
    all the same, without papermill's "unknown parameter" warning. Any other unknown name still warns."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell('figures = {"n_boot": 100}')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("from pathlib import Path\nPath(results_dir, 'out.txt').write_text('ok')")]
    nbformat.write(nb, str(project / "notebooks" / "figures.ipynb"))
    with caplog.at_level(logging.WARNING, logger="papermill"):
        assert stage.main(["figures"]) == 0
    assert "unknown parameter" not in caplog.text
    assert (project / "results" / "figures" / "out.txt").read_text() == "ok"
    quiet = stage._DeclaredElsewhere({"results_dir"})
    record = lambda name: logging.LogRecord("papermill", logging.WARNING, "", 0, f"Passed unknown parameter: {name}", None, None)  # noqa: E731
    assert not quiet.filter(record("results_dir")) and quiet.filter(record("resluts_dir"))


def test_notebook_failure_prints_its_error_last_and_touches_no_output(project, capsys):
    _notebook(project / "notebooks" / "figures.ipynb",
              "open(results_dir + '/out.txt', 'w').write('half')\nraise ValueError('too few\\nprompts')")
    assert stage.main(["figures"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: stage figures failed in cell 3: ValueError: too few prompts"
    assert err[-2].endswith("the failed notebook is kept at results/.staging/figures/figures.ipynb")
    assert (project / "results" / "figures" / "out.txt").read_text() == "previous\n"
    assert not (project / "results" / "figures" / "params.yaml").exists()
    assert (project / "results" / ".staging" / "figures" / "figures.ipynb").exists()


def test_a_kernel_that_dies_while_starting_is_started_again(project, capsys, monkeypatch):
    """No cell has run when the kernel dies before answering, so the stage starts another (a bounded number
    of times); any other error of papermill's is not retried."""
    import papermill

    _notebook(project / "notebooks" / "figures.ipynb",
              "from pathlib import Path\nPath(results_dir, 'out.txt').write_text(f'{results_dir} {figures[\"n_boot\"]}\\n')")
    real, calls = papermill.execute_notebook, []

    def dies_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(stage.KERNEL_DIED)
        return real(*args, **kwargs)

    monkeypatch.setattr(papermill, "execute_notebook", dies_first)
    assert stage.main(["figures"]) == 0 and len(calls) == 2
    assert "kernel died while starting (attempt 1 of 3)" in capsys.readouterr().err
    assert (project / "results" / "figures" / "out.txt").read_text() == "results/.staging/figures 200\n"

    def always_dies(*args, **kwargs):
        calls.append(1)
        raise RuntimeError(stage.KERNEL_DIED)

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", always_dies)
    with pytest.raises(RuntimeError, match=stage.KERNEL_DIED):
        stage.main(["figures"])
    assert len(calls) == stage.KERNEL_STARTS

    def other(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("something else")

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", other)
    with pytest.raises(RuntimeError, match="something else"):
        stage.main(["figures"])
    assert len(calls) == 1


def test_bad_parameters_exit_2_before_anything_starts(project, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump({"figures": {**FIGURES["figures"], "n_boot": 5}}))
    assert stage.main(["figures"]) == 2
    assert capsys.readouterr().err.startswith("error: figures.n_boot")
    assert not (project / "results" / ".staging").exists()


def test_timing_keys_follow_one_convention():
    timing = ["seconds", "sweep_seconds", "seconds_per_prompt", "aisp_seconds_per_prompt", "time_generation_s",
              "time_total_s"]
    other = ["sigma", "best_reward", "timestamp", "n_prompts", "secondsx", "lifetime_s"]
    assert all(is_timing_key(k) for k in timing)
    assert not any(is_timing_key(k) for k in other)
    record = {"reward": 1.5, "seconds": {"prompts_s": 1.0}, "cost": {"new_tokens": 8, "time_reward_s": 0.1},
              "rows": [{"N": 1, "sweep_seconds": 2.0}]}
    assert strip_timing(record) == {"reward": 1.5, "cost": {"new_tokens": 8}, "rows": [{"N": 1}]}


# --- publication is all or nothing -------------------------------------------------------------

OLD = {"a.txt": "old a\n", "sub/b.json": '{"old": true}\n', "figures.ipynb": "old notebook\n"}
NEW = {"a.txt": "new a\n", "sub/b.json": '{"new": true}\n', "z.png": "new png", "figures.ipynb": "new notebook\n"}
RENAMES = 1 + len(NEW)  # the journal's, then one per file
TEMP = ".a.txt.k2j4h1x9.tmp"  # named as io.atomic_path names its temporary files


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


@pytest.fixture(params=["figures", "figures/rank0"], ids=["one-process", "sharded"])
def publication(request, tmp_path, monkeypatch) -> Path:
    """Previous results in results/figures and a complete staging folder with the new ones.

    ``sharded``: the staged files are rank 0's folder, beside a rank 1 folder that is never
    published (what run_stage hands _publish after accelerate launch). A temporary file left by a
    killed writer sits in staging and another in the results; neither may end up published.
    Returns the staged folder (relative to the project root, the working directory).
    """
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)  # the stage command reads the stages from it
    _write(tmp_path / "results" / "figures", OLD)
    (tmp_path / "results" / "figures" / TEMP).write_text("half")
    staged = Path("results/.staging") / request.param
    _write(tmp_path / staged, {**NEW, TEMP: "half"})
    if request.param.endswith("rank0"):
        _write(tmp_path / "results/.staging/figures/rank1", {"a.txt": "rank 1's copy\n"})
    return staged


def _killed_publish(staged: Path, after: int) -> subprocess.CompletedProcess:
    """Run ``_publish`` in a child process that the fault hook kills after ``after`` renames."""
    code = ("import sys; from pathlib import Path; from prelogit import stage; "
            "stage._publish('figures', Path(sys.argv[1]), Path('results/figures'))")
    return subprocess.run([sys.executable, "-c", code, str(staged)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, stage.FAULT_ENV: str(after)})


def _recover_cli(after: int | None = None) -> subprocess.CompletedProcess:
    """``python -m prelogit.stage --recover`` as a user would run it (optionally killed, see above)."""
    env = {k: v for k, v in os.environ.items() if k != stage.FAULT_ENV}
    if after is not None:
        env[stage.FAULT_ENV] = str(after)
    return subprocess.run([sys.executable, "-m", "prelogit.stage", "--recover"], capture_output=True, text=True,
                          timeout=120, env=env)


def test_publish_moves_exactly_the_new_outputs_and_no_temporary_file(publication):
    stage._publish("figures", publication, Path("results/figures"))
    assert _snapshot(Path("results/figures")) == {k: v.encode() for k, v in NEW.items()}
    assert not Path("results/.staging").exists()


@pytest.mark.parametrize("after", range(1, RENAMES + 1))
def test_a_kill_after_the_journal_is_rolled_forward_by_the_next_run(publication, after):
    before = _snapshot(Path("results/figures"))
    killed = _killed_publish(publication, after)
    assert killed.returncode == 137, killed.stderr
    marker = stage.marker_path("figures")
    assert marker.is_file(), "the journal must exist from the first move on"
    journal = json.loads(marker.read_text())
    assert journal["from"] == publication.as_posix() and journal["to"] == "results/figures"
    assert journal["files"] == ["a.txt", "sub/b.json", "z.png", "figures.ipynb"]  # the notebook last
    moved = after - 1
    half = _snapshot(Path("results/figures"))
    if 0 < moved < len(NEW):  # what a reader would see without the journal: a mix of old and new
        assert half["a.txt"] == NEW["a.txt"].encode() and half["figures.ipynb"] == OLD["figures.ipynb"].encode()
    elif moved == 0:
        assert half == before

    recovered = _recover_cli()
    assert recovered.returncode == 0, recovered.stderr
    assert (f"recovered: completed the interrupted publication of results/figures "
            f"({len(NEW) - moved} of {len(NEW)} files moved now") in recovered.stderr
    assert _snapshot(Path("results/figures")) == {k: v.encode() for k, v in NEW.items()}
    assert not Path("results/.staging").exists()
    again = _recover_cli()
    assert again.returncode == 0 and "nothing to recover" in again.stderr


def test_a_kill_before_the_journal_leaves_the_results_byte_identical(publication):
    before = _snapshot(Path("results/figures"))
    staged = _snapshot(Path("results/.staging"))
    killed = _killed_publish(publication, 0)
    assert killed.returncode == 137, killed.stderr
    assert not stage.marker_path("figures").exists()
    assert _snapshot(Path("results/figures")) == before
    # an incomplete staging folder is not published by recovery; the next run of the stage discards it
    recovered = _recover_cli()
    assert recovered.returncode == 0 and "nothing to recover" in recovered.stderr
    assert _snapshot(Path("results/figures")) == before
    assert set(_snapshot(Path("results/.staging"))) == set(staged) | {"figures/.PUBLISHING.tmp"}


def test_a_kill_during_recovery_is_recovered_too(publication):
    assert _killed_publish(publication, 2).returncode == 137  # the journal and a.txt
    assert _recover_cli(after=1).returncode == 137  # recovery killed after moving sub/b.json
    assert stage.marker_path("figures").is_file()
    recovered = _recover_cli()
    assert recovered.returncode == 0 and "(2 of 4 files moved now" in recovered.stderr
    assert _snapshot(Path("results/figures")) == {k: v.encode() for k, v in NEW.items()}


def test_a_journal_that_cannot_be_completed_stops_every_run(publication, capsys):
    assert _killed_publish(publication, 2).returncode == 137
    (publication / "z.png").unlink()  # gone from staging, never reached the results
    assert stage.main(["--recover"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot complete the publication of results/figures") and "z.png" in err
    assert stage.marker_path("figures").is_file()  # kept: nothing is discarded silently


def test_the_wrapper_completes_an_interrupted_publication_before_anything_else(project, capsys):
    """The next ``python -m prelogit.stage`` (what dvc repro runs after a kill) rolls forward first:
    its notebook already reads the completed results."""
    _write(project / "results" / "figures", OLD)
    staged = Path("results/.staging/figures")
    _write(project / staged, NEW)
    assert _killed_publish(staged, 2).returncode == 137
    _notebook(project / "notebooks" / "figures.ipynb",
              "from pathlib import Path\n"
              "Path(results_dir, 'out.txt').write_text(Path('results/figures/figures.ipynb').read_text())")
    assert stage.main(["figures"]) == 0
    assert "recovered: completed the interrupted publication of results/figures (3 of 4" in capsys.readouterr().err
    out = project / "results" / "figures"
    assert (out / "out.txt").read_text() == NEW["figures.ipynb"]  # the recovered notebook, read by the new run
    assert (out / "z.png").read_text() == NEW["z.png"] and (out / "a.txt").read_text() == NEW["a.txt"]
    assert not (project / "results" / ".staging").exists()

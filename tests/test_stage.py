"""``python -m prelogit.stage``: outputs appear all at once after success, never after a failure.

These run the wrapper on a two-cell stand-in for the figures notebook in a temporary folder (a
real kernel, seconds); tests/test_pipeline.py runs the real stages under DVC.
"""

from __future__ import annotations

import nbformat
import pytest
import yaml

from prelogit import stage
from prelogit.io import is_timing_key, strip_timing

FIGURES = {"figures": {"n_boot": 200, "ci_level": 0.9, "seed": 0, "power": 0.8, "verdict_N": 32, "margin_sd": 0.2}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with params.yaml, notebooks/figures.ipynb (writes out.txt) and previous results."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FIGURES))
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results" / "figures").mkdir(parents=True)
    (tmp_path / "results" / "figures" / "out.txt").write_text("previous\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('results_dir = "results/_smoke/figures"\nn_boot = 100')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


def test_success_moves_every_output_into_place_and_removes_staging(project):
    _notebook(project / "notebooks" / "figures.ipynb",
              "from pathlib import Path\nPath(results_dir, 'out.txt').write_text(f'{results_dir} {n_boot}\\n')")
    assert stage.main(["figures"]) == 0
    out = project / "results" / "figures"
    assert (out / "out.txt").read_text() == "results/.staging/figures 200\n"  # the notebook ran in staging
    assert yaml.safe_load((out / "params.yaml").read_text())["results_dir"] == "results/figures"
    executed = (out / "figures.ipynb").read_text()
    assert "start_time" not in executed and ".staging" not in executed and '"id": "injected-parameters"' in executed
    assert not (project / "results" / ".staging").exists()


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

"""The whole DVC pipeline on the notebooks' smoke parameters, in a copy of the repository.

Checks that ``dvc repro`` runs every stage through papermill, that a second ``dvc repro`` has
nothing to do, and that a malformed params.yaml stops the first stage that reads it, naming the
key, without touching the results already there.
"""

import ast
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import papermill as pm
import pytest
import yaml

from prelogit import params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.pipeline


def smoke_params() -> dict:
    """params.yaml rebuilt from the notebooks' parameters cells (the smoke configuration)."""
    out: dict = {}
    for stage, spec in params.STAGES.items():
        nb = pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb"))
        for i, section in enumerate(spec["sections"]):
            for key in params.SCHEMA[section]:
                name = key if i == 0 else f"{section}_{key}"
                out.setdefault(section, {})[key] = ast.literal_eval(nb[name]["default"])
    # share the converted model with the test session instead of converting it again
    out["model"]["cache_dir"] = str(Path(os.environ.get("PRELOGIT_CACHE", ROOT / "models")).resolve())
    return out


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith("results/") or f == "dvc.lock" or not (ROOT / f).is_file():
            continue
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def test_repro_runs_every_stage_and_then_has_nothing_to_do(repo):
    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in params.STAGES:
        assert f"Running stage '{stage}'" in first.stdout
        executed = repo / "results" / stage / f"{stage}.ipynb"
        assert executed.exists()
        assert "start_time" not in executed.read_text()  # timestamps scrubbed
    assert (repo / "dvc.lock").exists()
    metrics = _dvc(repo, "metrics", "show", "--json")
    assert metrics.returncode == 0 and "best_reward" in metrics.stdout
    second = _dvc(repo, "repro")
    assert second.returncode == 0
    assert "Running stage" not in second.stdout, second.stdout
    status = _dvc(repo, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


def test_malformed_params_stop_the_stage_and_keep_results(repo):
    good = (repo / "params.yaml").read_text()
    results = repo / "results" / "aisp" / "metrics.json"
    before = _sha(results)
    p = yaml.safe_load(good)
    p["aisp"]["sigma"] = -1.0
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        run = _dvc(repo, "repro")
        assert run.returncode != 0
        assert "aisp.sigma must be > 0" in run.stdout + run.stderr
        assert "Running stage 'bon'" not in run.stdout  # bon does not read aisp and is up to date
        assert _sha(results) == before
    finally:
        (repo / "params.yaml").write_text(good)

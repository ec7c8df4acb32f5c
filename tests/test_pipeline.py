"""The whole DVC pipeline on the notebooks' smoke parameters, in a copy of the repository.

Checks that ``dvc repro`` runs every stage through ``prelogit.stage`` and papermill, that a second
``dvc repro`` has nothing to do, that a malformed params.yaml stops the first stage that reads it,
naming the key, without touching the results already there, that a stage killed mid-run or failing
in its notebook leaves every previous output byte-identical (the failure's one-line error printed
last), and that two runs with the same seed give the same samples and curves, timing aside.

Every DVC run here loads ``tests/netguard/sitecustomize.py`` in each Python process it starts (DVC,
the stage wrapper, papermill, the kernels): a connection off this machine is refused and logged,
and :func:`_dvc` fails the test if the log is not empty.
"""

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import papermill as pm
import psutil
import pytest
import yaml

from prelogit import io as results_io
from prelogit import params
from prelogit.io import strip_timing

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.pipeline


def smoke_params() -> dict:
    """params.yaml rebuilt from the smoke configuration: each stage's own section from its notebook's
    parameters cell, the shared sections from params.SMOKE_SHARED."""
    out: dict = {}
    owned = {spec.sections[0] for spec in params.stages(ROOT).values()}
    for stage, spec in params.stages(ROOT).items():
        nb = pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb"))
        for i, section in enumerate(spec.sections):
            if i > 0 and section in owned:  # a stage's own section takes its own notebook's smoke values (the replicate
                continue                    # notebook reads the tune section too, with a smaller smoke search for nbval)
            if section in params.SMOKE_SHARED:
                out.setdefault(section, dict(params.SMOKE_SHARED[section]))
            else:
                out.setdefault(section, ast.literal_eval(nb[section]["default"]))
    out["launch"] = {"launcher": "python", "num_processes": 1, "config_file": None}  # read by the wrapper only
    # share the converted model with the test session instead of converting it again
    out["model"]["cache_dir"] = str(Path(os.environ.get("PRELOGIT_CACHE", ROOT / "models")).resolve())
    return out


def _env(repo: Path) -> dict:
    """Offline, with the netguard loaded by every Python process, its refusals logged next to ``repo``."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "tests" / "netguard"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": pythonpath, "PRELOGIT_NETGUARD": "1", "PRELOGIT_NETGUARD_LOG": str(_netlog(repo)),
            "PRELOGIT_NETGUARD_SEEN": str(repo.parent / "netguard-processes.log")}


def _netlog(repo: Path) -> Path:
    return repo.parent / "netguard.log"


def _assert_no_network(repo: Path) -> None:
    log = _netlog(repo)
    refused = log.read_text() if log.exists() else ""
    assert refused == "", f"a pipeline process tried to reach the network:\n{refused}"


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=_env(repo))
    _assert_no_network(repo)
    return run


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _results(repo: Path) -> dict[str, str]:
    """sha256 of every file under results/, staging aside."""
    root = repo / "results"
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and ".staging" not in p.relative_to(root).parts}


def copy_repository(dest: Path) -> Path:
    """The repository's files (tracked and untracked-but-not-ignored) copied to ``dest``, without results/
    and dvc.lock: a pipeline that runs there starts from nothing and never touches the checkout. The
    sampling benchmark's file is kept: its stage is frozen (never run by dvc repro, which only records
    the file as it is, and fails if it is missing)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (f.startswith("results/") and not f.startswith("results/benchmarks/")) or f == "dvc.lock" \
                or not (ROOT / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repository(tmp_path_factory.mktemp("pipeline") / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def test_repro_runs_every_stage_and_then_has_nothing_to_do(repo):
    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in params.stages(ROOT):
        assert f"Running stage '{stage}'" in first.stdout
        executed = repo / "results" / stage / f"{stage}.ipynb"
        assert executed.exists()
        assert "start_time" not in executed.read_text()  # timestamps scrubbed
        assert ".staging" not in executed.read_text()  # names the folder its outputs are in
        flat = yaml.safe_load((repo / "results" / stage / "params.yaml").read_text())
        assert flat["results_dir"] == f"results/{stage}"
    assert not (repo / "results" / ".staging").exists()
    assert (repo / "dvc.lock").exists()
    guarded = (repo.parent / "netguard-processes.log").read_text()
    for process in ("bin/dvc repro", "-m prelogit.stage prepare", "-m prelogit.stage figures", "ipykernel_launcher"):
        assert process in guarded, f"the netguard did not reach {process!r}:\n{guarded}"
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
    p["aisp"]["lit_sigma"] = -1.0
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        run = _dvc(repo, "repro")
        assert run.returncode != 0
        assert "aisp.lit_sigma must be > 0" in run.stdout + run.stderr
        assert "Running stage 'bon'" not in run.stdout  # bon does not read aisp and is up to date
        assert _sha(results) == before
    finally:
        (repo / "params.yaml").write_text(good)


def _in_the_middle(executed: Path) -> bool:
    """Papermill has saved the executed notebook with a cell completed and cells still to run."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):  # not written yet, or caught while papermill rewrites it
        return False
    status = [c.get("metadata", {}).get("papermill", {}).get("status") for c in nb["cells"]]
    return "completed" in status and ("pending" in status or "running" in status)


def test_killed_stage_leaves_previous_outputs_and_repro_recovers(repo):
    before = _results(repo)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["aisp"]["lit_sigma"] = p["aisp"]["lit_sigma"] * 1.5  # aisp (and figures after it) must re-run
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    executed = repo / "results" / ".staging" / "aisp" / "aisp.ipynb"
    with open(repo.parent / "killed.log", "w") as out:
        proc = subprocess.Popen(["dvc", "repro", "aisp"], cwd=repo, env=_env(repo), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not _in_the_middle(executed):
                assert proc.poll() is None, "dvc repro aisp ended before it could be killed mid-run: " + \
                    (repo.parent / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "aisp never got under way"
                time.sleep(0.1)
            # DVC, the wrapper and papermill share the group; the kernel runs in its own session
            family = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in family:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _results(repo) == before, "a killed stage changed results/"
    _assert_no_network(repo)

    # DVC drops lock entries of processes that no longer exist and the wrapper empties staging:
    # a plain dvc repro is all a user has to run after a kill.
    again = _dvc(repo, "repro")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "had been killed. Auto removed it from the lock file" in again.stdout + again.stderr
    assert "Running stage 'aisp'" in again.stdout and "Running stage 'bon'" not in again.stdout
    assert not (repo / "results" / ".staging").exists()
    status = _dvc(repo, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


def test_same_seed_gives_identical_samples_and_curves(repo):
    """tune, bon, aisp and misvo re-run with the same parameters: every output but timing.json is the very
    same bytes (samples, curves, metrics, the executed notebooks); timing lives in timing.json alone."""
    stages = ("tune", "bon", "aisp", "misvo")
    paths = sorted(p for stage in stages for p in (repo / "results" / stage).iterdir() if p.is_file())
    assert {p.name for p in paths} >= {"metrics.json", "summary.json", "timing.json", "samples.jsonl", "aisp.ipynb"}
    first = {p: p.read_bytes() for p in paths}
    run = _dvc(repo, "repro", "--force", "-s", *stages)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(f"Running stage '{s}'" in run.stdout for s in stages)
    assert sorted(p for stage in stages for p in (repo / "results" / stage).iterdir() if p.is_file()) == paths
    for path in paths:
        if path.name == "timing.json":
            timing = json.loads(path.read_text())
            assert timing and strip_timing(timing) == {}, f"{path.relative_to(repo)} holds more than timing"
            continue
        assert path.read_bytes() == first[path], f"{path.relative_to(repo)} differs between two runs"
        if path.suffix in (".json", ".jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.suffix == ".jsonl" \
                else [json.loads(path.read_text())]
            assert strip_timing(rows) == rows, f"{path.relative_to(repo)} holds timing keys (they belong in timing.json)"


def test_notebook_failure_prints_its_error_last_and_keeps_results(repo):
    # A damaged reward head passes the params step (which checks values, counts and sources, not
    # file contents) and fails inside the notebook, where it is first read.
    head = repo / "results" / "prepare" / "reward_head.safetensors"
    good = head.read_bytes()
    before = _results(repo)
    head.write_bytes(b"not a safetensors file")
    broken = _results(repo)
    try:
        run = _dvc(repo, "repro", "-s", "bon")
        assert run.returncode != 0
        expected = re.compile(r"error: stage bon failed in cell \d+: RewardError: reward head "
                              r"results/prepare/reward_head.safetensors is not a readable safetensors file .*; "
                              r"re-create it with the prepare stage \(dvc repro prepare\)")
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        ours = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert ours and expected.fullmatch(lines[ours[-1]]), run.stderr[-3000:]
        # after the wrapper's own last line only DVC speaks ("ERROR: failed to reproduce ...")
        assert all(line.startswith("ERROR") for line in lines[ours[-1] + 1:]), lines[ours[-1]:]
        assert "failed notebook is kept at results/.staging/bon/bon.ipynb" in lines[ours[-1] - 1]
        assert (repo / "results" / ".staging" / "bon" / "bon.ipynb").exists()
        assert _results(repo) == broken  # nothing of bon's changed
    finally:
        head.write_bytes(good)
    assert _results(repo) == before


def _close(a, b, path: str = "") -> None:
    """``a`` and ``b`` have the same structure, strings, integers and token lists, and floats within 1e-4."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _well_conditioned(x):
    """``x`` with each AISP iteration's ``sd_reward_term`` (the sd over a chain's draws of r / lam_eff)
    multiplied back by its ``lam_eff``: the sd of the rewards themselves. The smoke search can select
    lambda = 0.001 (the lambda -> 0 corner), and r / 0.001 turns the float32 reward model's rounding
    (~1e-7, identical greedy responses scored in differently composed batches) into 1e-4, the
    comparison's whole tolerance; the rewards' own sd is compared at the rewards' tolerance."""
    if isinstance(x, dict):
        out = {k: _well_conditioned(v) for k, v in x.items()}
        if "sd_reward_term" in x and "lam_eff" in x:
            out["sd_reward_term"] = [sd * lam for sd, lam in zip(x["sd_reward_term"], x["lam_eff"])]
        return out
    if isinstance(x, list):
        return [_well_conditioned(v) for v in x]
    return x


def test_two_processes_give_the_records_of_one(repo):
    """The smoke bon and aisp stages under accelerate launch with two CPU processes (gloo): each process runs
    its share of the prompts, rank 0 publishes, and the records are those of one plain process.

    Both runs use the model in float64. A process batches only its own prompts, so the left-padded prefill
    has other shapes than in one process; in float32 that rounding can move a logit enough to flip one of
    the thousands of inverse-CDF draws, and the sample's continuation then differs (seen in the smoke run).
    In float64 the same rounding is some 1e-16, far below any draw's distance to a boundary, so every
    token, text and count must agree exactly. The reward model stays in float32 and scores differently
    composed batches, so floats are compared within 1e-4 (rewards are O(1) logits; a difference of float32
    rounding, ~1e-6, passes and anything a changed sample would cause does not).
    """
    files = {"bon": ["samples.jsonl", "curve.json", "base_rewards.json"],
             "aisp": ["samples.jsonl", "curve.json", "literature.jsonl", "variance.json"]}
    kept = {f: f.read_bytes() for s in files for f in (repo / "results" / s).iterdir()}  # restored at the end
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["model"]["dtype"] = "float64"
    (repo / "one.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    p["launch"] = {"launcher": "accelerate", "num_processes": 2, "config_file": None}
    (repo / "two.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = _env(repo)
    outputs = {}
    try:
        for config in ("one.yaml", "two.yaml"):
            for stage in files:
                run = subprocess.run([sys.executable, "-m", "prelogit.stage", stage, "--params", config], cwd=repo,
                                     capture_output=True, text=True, env=env, timeout=1200)
                _assert_no_network(repo)
                assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
                assert ("--num_processes 2" in run.stderr) == (config == "two.yaml")
                assert not (repo / "results" / ".staging").exists()
                executed = (repo / "results" / stage / f"{stage}.ipynb").read_text()
                assert ".staging" not in executed and "rank0" not in executed
                for name in files[stage]:
                    raw = (repo / "results" / stage / name).read_text()
                    outputs[config, stage, name] = ([json.loads(line) for line in raw.splitlines()]
                                                    if name.endswith(".jsonl") else json.loads(raw))
        for stage, names in files.items():
            for name in names:
                _close(_well_conditioned(strip_timing(outputs["one.yaml", stage, name])),
                       _well_conditioned(strip_timing(outputs["two.yaml", stage, name])), f"{stage}/{name}")
    finally:
        for f, before in kept.items():
            f.write_bytes(before)
        for config in ("one.yaml", "two.yaml"):
            (repo / config).unlink(missing_ok=True)


def test_metrics_and_a_one_parameter_experiment_fit_a_terminal(repo):
    """``dvc metrics show`` holds headline numbers only, and after a real two-experiment run
    ``dvc exp show --only-changed`` fits an ordinary terminal (issue 20: metrics a reader can diff)."""
    metrics = _dvc(repo, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    files = next(iter(json.loads(metrics.stdout).values()))["data"]  # the workspace's entry (its key is "")
    for name, content in files.items():
        leaves = results_io._leaves(content["data"])
        limit = results_io.MAX_HEADLINE
        assert len(leaves) <= limit, f"{name} holds {len(leaves)} values in dvc metrics show (at most {limit})"
    git = ["git", "-c", "user.name=prelogit-test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True, capture_output=True)
    base = yaml.safe_load((repo / "params.yaml").read_text())["figures"]["n_boot"]
    for n_boot in (base + 50, base + 100):
        run = _dvc(repo, "exp", "run", "-S", f"figures.n_boot={n_boot}")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Running stage 'figures'" in run.stdout
        assert sum(f"Running stage '{s}'" in run.stdout for s in params.stages(ROOT)) == 1, run.stdout  # figures only
    show = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=repo, capture_output=True,
                          text=True, env={**_env(repo), "COLUMNS": "400"})  # as wide as the table wants
    assert show.returncode == 0, show.stderr
    width = max(len(line) for line in show.stdout.splitlines())
    print(show.stdout)
    # an ordinary terminal: 200 columns (a maximised window on a laptop screen); the table holds the
    # experiment names, the changed parameter, the headline values that moved and the stages' seconds
    assert width <= 200, f"dvc exp show --only-changed is {width} columns wide:\n{show.stdout}"

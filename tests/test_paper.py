"""The paper-scale parameter set is complete and valid, and a machine without a GPU is told so.

Issue 12: ``--num_processes`` and ``--config_file`` become the ``launch`` section's overrides; a missing
accelerate configuration or too few GPUs is a one-line problem, never a traceback; a model too large
for one GPU gets ``model.device_map: auto`` (a pure decision, tested without a GPU); and the whole
paper-scale path runs end to end on the CPU with two processes and tiny models (tests/tiny_paper.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prelogit import params, paper

ROOT = Path(__file__).resolve().parents[1]


def test_paper_params_cover_every_section_and_validate():
    default, big = params.load(ROOT / "params.yaml"), params.load(ROOT / "params-paper.yaml")
    assert set(big) == set(default)
    for stage in params.stages(ROOT):
        params.stage_parameters(stage, big, ROOT)  # raises on any missing or out-of-range key
    assert big["generation"]["max_new_tokens"] == 128 and big["reward"]["kind"] == "hf"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_missing_gpu_and_hub_give_a_message_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "prelogit.paper", "--check-only"], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "hub cannot be reached" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overrides_name_only_the_changed_keys():
    default = {"aisp": {"sigma": 0.5, "n": 8}, "bon": {"budgets": [1, 2]}}
    big = {"aisp": {"sigma": 0.5, "n": 32}, "bon": {"budgets": [1, 2, 4]}}
    assert paper.overrides(default, big) == ["-S", "aisp.n=32", "-S", "bon.budgets=[1, 2, 4]"]


def test_gpu_params_validate_and_take_every_test_prompt_to_256():
    default, gpu = params.load(ROOT / "params.yaml"), params.load(ROOT / "params-gpu.yaml")
    merged = {**default, **gpu}
    for stage in params.stages(ROOT):
        params.stage_parameters(stage, merged, ROOT)
    assert gpu["model"]["device"] == "cuda"
    assert gpu["bon"]["large_prompts"] == gpu["bon"]["n_prompts"] == default["prepare"]["n_test"]
    assert gpu["aisp"]["large_prompts"] == gpu["aisp"]["lit_prompts"] == gpu["aisp"]["n_prompts"]
    assert gpu["bon"]["large_samples"] == gpu["aisp"]["large_N"] == 256
    assert paper.preflight(gpu, check_hub=False) == ([] if torch.cuda.is_available() else
                                                     ["model.device is cuda but no CUDA GPU is visible: run on a "
                                                      "machine with a GPU (the paper's 7-8B models need about 16 GB "
                                                      "of GPU memory in bf16)"])


# ---- sharding and models larger than one GPU (issue 12) --------------------------------------

GiB = 2**30


def test_device_map_decision():
    # 16 GB of weights: 19.2 GB with the margin
    w = 16 * 10**9
    assert paper.device_map_decision(w, [80 * GiB], 1) == (None, None)  # fits one GPU
    assert paper.device_map_decision(w, [24 * GiB, 24 * GiB], 2) == (None, None)  # fits each process's GPU
    assert paper.device_map_decision(w, [16 * GiB, 16 * GiB], 1) == ("auto", None)  # needs both GPUs
    assert paper.device_map_decision(w, [16 * GiB, 16 * GiB], 2) == ("auto", None)  # ... in one process
    assert paper.device_map_decision(w, [80 * GiB, 16 * GiB], 2) == ("auto", None)  # process 2's GPU is too small
    device_map, problem = paper.device_map_decision(w, [8 * GiB, 8 * GiB], 1)
    assert device_map is None and "do not fit in the 2 visible GPU(s)" in problem and "smaller model" in problem
    assert paper.device_map_decision(None, [8 * GiB], 1) == (None, None)  # size unknown: nothing to decide
    assert paper.device_map_decision(w, [], 1) == (None, None)  # no GPU: preflight says so elsewhere
    # the margin is what tips it: weights alone would fit
    assert paper.device_map_decision(int(15.5 * GiB), [16 * GiB, 16 * GiB], 1) == ("auto", None)


def test_model_bytes_counts_the_weight_files(tmp_path, tiny_lm, tokenizer):
    folder = tmp_path / "lm"
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert paper.model_bytes(str(folder), check_hub=False) == (folder / "model.safetensors").stat().st_size
    # a repository with both formats holds the same weights twice: only the safetensors count
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    assert paper.model_bytes(str(folder), check_hub=False) == (folder / "model.safetensors").stat().st_size
    assert paper.model_bytes("embedded") is None
    assert paper.model_bytes(str(tmp_path), check_hub=False) is None  # no weights there
    assert paper.model_bytes("nobody/not-cached-anywhere", check_hub=False) is None


def test_num_processes_becomes_launch_overrides():
    default = {"launch": {"launcher": "python", "num_processes": 1, "config_file": None}, "model": {"device": "cpu"}}
    run = paper.overlay({"model": {"device": "cpu"}}, paper.cli_choices(2, None))
    assert paper.overrides(default, run) == ["-S", 'launch.launcher="accelerate"', "-S", "launch.num_processes=2"]
    run = paper.overlay({}, paper.cli_choices(None, "acc.yaml"))
    assert paper.overrides(default, run) == ["-S", 'launch.launcher="accelerate"',
                                             "-S", 'launch.config_file="acc.yaml"']
    assert paper.cli_choices(None, None) == {}
    assert paper.overlay(default, run)["launch"] == {"launcher": "accelerate", "num_processes": 1,
                                                     "config_file": "acc.yaml"}


def _check_only(tmp_path: Path, file: dict, *extra: str) -> subprocess.CompletedProcess:
    """``python -m prelogit.paper --check-only --no-hub-check`` on a params file holding ``file``."""
    path = tmp_path / "params-test.yaml"
    path.write_text(yaml.safe_dump(file, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "prelogit.paper", "--check-only", "--no-hub-check", "--params",
                           str(path), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _problems(proc: subprocess.CompletedProcess) -> list[str]:
    """The problem lines of a refused run; asserts the message's shape (a header, then one line per problem)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0] == "The paper-scale run cannot start here:" and all(x.startswith("  - ") for x in lines[1:]), lines
    return lines[1:]


def _model_section() -> dict:
    return {**params.load(ROOT / "params.yaml")["model"], "device_map": None}


def test_missing_accelerate_configuration_is_a_message(tmp_path):
    missing = tmp_path / "no-such-accelerate.yaml"
    launch = {"launcher": "accelerate", "num_processes": 2, "config_file": str(missing)}
    (problem,) = _problems(_check_only(tmp_path, {"model": _model_section(), "launch": launch}))
    assert f"{missing} does not exist" in problem and "accelerate config" in problem
    # the same from the command line
    (problem,) = _problems(_check_only(tmp_path, {"model": _model_section()}, "--num_processes", "2",
                                       "--config_file", str(missing)))
    assert f"{missing} does not exist" in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_too_few_gpus_is_a_message(tmp_path):
    found = _problems(_check_only(tmp_path, {"model": {**_model_section(), "device": "cuda"}}, "--num_processes", "2"))
    assert len(found) == 2, found
    assert "no CUDA GPU is visible" in found[0]
    assert "launch.num_processes = 2 but this machine has 0 visible CUDA GPU(s)" in found[1]


def _workers(seen: list[str], stage: str) -> set[str]:
    """pids of the ``python -m prelogit.stage STAGE ... --worker`` processes in the netguard's "pid cmdline" log
    (not the ``accelerate launch ... -m prelogit.stage STAGE ... --worker`` process that starts them)."""
    out = set()
    for line in seen:
        words = line.split()
        if ("--worker" in words and "launch" not in words and "prelogit.stage" in words[:-1]
                and words[words.index("prelogit.stage") + 1] == stage):
            out.add(words[0])
    return out


@pytest.mark.pipeline
def test_paper_path_runs_end_to_end_with_two_processes(tmp_path, smollm_dir):
    """``prelogit.paper --num_processes 2`` with a hub-format tiny model and reward model and HH-RLHF-format
    prompts, in a copy of the repository: ``dvc exp run`` runs every stage, the generating ones as two
    accelerate processes each, offline, and the experiment and its results are there."""
    import tiny_paper
    from test_pipeline import _assert_no_network, _env, copy_repository, smoke_params

    repo = copy_repository(tmp_path / "repo")
    smoke = smoke_params()
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    tiny = tiny_paper.build(tmp_path / "tiny", smollm_dir, smoke)
    tiny_paper.commit_all(repo)
    run = subprocess.run([sys.executable, "-m", "prelogit.paper", "--params", str(tiny), "--no-hub-check",
                          "--name", "tiny", "--num_processes", "2"], cwd=repo, capture_output=True, text=True,
                         env=_env(repo), timeout=3600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    _assert_no_network(repo)
    assert "dvc exp run -n tiny" in run.stdout and "launch.num_processes=2" in run.stdout
    # the workspace holds the experiment's parameters and every stage's results
    used = yaml.safe_load((repo / "params.yaml").read_text())
    assert used["launch"] == {"launcher": "accelerate", "num_processes": 2, "config_file": None}
    assert used["model"]["name"] == str(tiny.parent / "lm") and used["reward"]["name"] == str(tiny.parent / "reward")
    for stage in params.stages(ROOT):
        assert (repo / "results" / stage / f"{stage}.ipynb").exists(), stage
    prompts = [json.loads(line) for line in (repo / "results" / "prepare" / "prompts.jsonl").read_text().splitlines()]
    hh = [p for p in prompts if p["split"] != "qa"]  # the HH-RLHF dialogues; qa: the ChatterBot questions
    assert len(hh) == 11 and all("<|im_start|>user" in p["prompt"] for p in hh)
    assert sum(p["split"] == "qa" for p in prompts) == smoke["prepare"]["n_qa"]
    assert not (repo / "results" / ".staging").exists()
    # every generating stage ran as two accelerate processes
    seen = (repo.parent / "netguard-processes.log").read_text().splitlines()
    for stage in (s for s, spec in params.stages(ROOT).items() if spec.sharded):
        assert len(_workers(seen, stage)) == 2, (stage, seen)
    # and DVC recorded the experiment under its name, on the commit it started from
    show = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, env=_env(repo))
    assert show.returncode == 0, show.stderr
    experiments = [rev for baseline in json.loads(show.stdout) for exp in baseline.get("experiments") or []
                   for rev in exp["revs"]]
    assert [rev["name"] for rev in experiments] == ["tiny"], experiments

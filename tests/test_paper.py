"""The paper-scale parameter set is complete and valid, and a machine without a GPU is told so."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prelogit import params, paper

ROOT = Path(__file__).resolve().parents[1]


def test_paper_params_cover_every_section_and_validate():
    default, big = params.load(ROOT / "params.yaml"), params.load(ROOT / "params-paper.yaml")
    assert set(big) == set(default)
    for stage in params.STAGES:
        params.stage_parameters(stage, big)  # raises on any missing or out-of-range key
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
    for stage in params.STAGES:
        params.stage_parameters(stage, merged)
    assert gpu["model"]["device"] == "cuda"
    assert gpu["bon"]["large_prompts"] == gpu["bon"]["n_prompts"] == default["prepare"]["n_test"]
    assert gpu["aisp"]["large_prompts"] == gpu["aisp"]["lit_prompts"] == gpu["aisp"]["n_prompts"]
    assert gpu["bon"]["large_samples"] == gpu["aisp"]["large_N"] == 256
    assert paper.preflight(gpu, check_hub=False) == ([] if torch.cuda.is_available() else
                                                     ["model.device is cuda but no CUDA GPU is visible: run on a "
                                                      "machine with a GPU (the paper's 7-8B models need about 16 GB "
                                                      "of GPU memory in bf16)"])

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

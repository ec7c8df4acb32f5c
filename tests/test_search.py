"""prelogit.search runs the tune stage's procedure: on the tune notebook's smoke configuration it selects
what the notebook selects, with the same scores."""

import ast
import os
from dataclasses import asdict
from pathlib import Path

import papermill as pm
import pytest

from prelogit import params, runs, search
from prelogit.io import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_select_per_reading_reproduces_the_tune_notebook(tmp_path):
    nb = ROOT / "notebooks" / "tune.ipynb"
    p = {k: ast.literal_eval(v["default"]) for k, v in pm.inspect_notebook(str(nb)).items()}  # the tune section
    model = {**params.SMOKE_SHARED["model"], "cache_dir": str(Path(os.environ.get("PRELOGIT_CACHE", ROOT / "models")).resolve())}
    pm.execute_notebook(str(nb), str(tmp_path / "tune.ipynb"), cwd=str(ROOT), progress_bar=False,
                        parameters={"results_dir": str(tmp_path), "model": model})
    selected = read_json(tmp_path / "selected.json")

    P = params.check_notebook("tune", {**p, "model": model})  # generation and reward: the smoke values, as in the notebook
    tune_params = asdict(P.tune)
    paths = params.stages(ROOT)["tune"].paths
    rows = runs.load_prompts(ROOT / paths["prompts_path"], "val", P.tune.n_prompts + P.tune.holdout_prompts)
    sampler, _ = runs.build_sampler(P.model, P.generation)
    reward, _, _ = runs.build_scorers(P.reward, ROOT / paths["reward_head_path"])
    got = search.select_per_reading(sampler, reward, rows[:P.tune.n_prompts], rows[P.tune.n_prompts:], tune_params, P.tune.seed,
                                    P.generation.max_new_tokens)

    # the same code path, inputs, seed, thread count and batch shapes in both processes: equal to the bit
    assert got["rms"] == selected["rms"]
    for reading, want in selected["readings"].items():
        have = got["readings"][reading]
        assert have["label"] == want["label"] and have["config"] == want["config"], reading
        assert have["val_minus_bon"] == want["val_minus_bon"], reading
        assert have["holdout_minus_bon"] == want["holdout_minus_bon"], reading

"""prelogit.search runs the tune stage's procedure: on the tune notebook's smoke configuration it selects
what the notebook selects, with the same scores."""

import ast
import os
from pathlib import Path

import papermill as pm
import pytest

from prelogit import runs, search
from prelogit.io import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_select_per_reading_reproduces_the_tune_notebook(tmp_path):
    nb = ROOT / "notebooks" / "tune.ipynb"
    p = {k: ast.literal_eval(v["default"]) for k, v in pm.inspect_notebook(str(nb)).items()}
    cache = str(Path(os.environ.get("PRELOGIT_CACHE", ROOT / "models")).resolve())
    pm.execute_notebook(str(nb), str(tmp_path / "tune.ipynb"), cwd=str(ROOT), progress_bar=False,
                        parameters={"results_dir": str(tmp_path), "model_cache_dir": cache})
    selected = read_json(tmp_path / "selected.json")

    tune_params = {k: p[k] for k in ("seed", "n_prompts", "holdout_prompts", "N", "rms_samples", "center", "readings",
                                     "n_random", "rungs", "eta", *search.SWEEP_KEYS)}
    rows = runs.load_prompts(ROOT / p["prompts_path"], "val", p["n_prompts"] + p["holdout_prompts"])
    sampler, _ = runs.build_sampler(p["model_name"], p["model_dtype"], p["model_device"], cache,
                                    p["generation_max_new_tokens"], p["generation_decode"], p["generation_temperature"],
                                    p["generation_top_k"], p["generation_top_p"], p["model_threads"], p["model_max_rows"],
                                    p["model_device_map"])
    reward, _, _ = runs.build_scorers(p["reward_kind"], p["reward_name"], p["reward_dtype"], str(ROOT / p["reward_head_path"]))
    got = search.select_per_reading(sampler, reward, rows[:p["n_prompts"]], rows[p["n_prompts"]:], tune_params, p["seed"],
                                    p["generation_max_new_tokens"])

    # the same code path, inputs, seed, thread count and batch shapes in both processes: equal to the bit
    assert got["rms"] == selected["rms"]
    for reading, want in selected["readings"].items():
        have = got["readings"][reading]
        assert have["label"] == want["label"] and have["config"] == want["config"], reading
        assert have["val_minus_bon"] == want["val_minus_bon"], reading
        assert have["holdout_minus_bon"] == want["holdout_minus_bon"], reading

"""params.yaml, the notebooks' parameters cells and dvc.yaml agree; bad params stop a stage early."""

import copy
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

from prelogit import params
from prelogit.checks import ParameterError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = params.load(ROOT / "params.yaml")
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.mark.parametrize("stage", sorted(params.STAGES))
def test_injected_keys_match_the_notebook_parameters_cell(stage):
    injected = set(params.stage_parameters(stage, PARAMS))
    declared = set(pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb")))
    assert injected == declared, {"not declared": injected - declared, "not injected": declared - injected}


@pytest.mark.parametrize("stage", sorted(params.STAGES))
def test_dvc_stage_tracks_the_sections_it_reads(stage):
    spec = DVC["stages"][stage]
    assert spec["params"] == params.STAGES[stage]["sections"]
    assert f"python -m prelogit.params {stage}" in spec["cmd"]
    assert f"notebooks/{stage}.ipynb" in spec["deps"]
    assert f"-f results/{stage}/params.yaml" in spec["cmd"]
    for path in params.STAGES[stage]["paths"].values():
        if Path(path).suffix:
            assert path in spec["deps"], f"{stage} reads {path} but does not list it as a dep"


def test_every_dvc_stage_has_a_schema():
    assert set(DVC["stages"]) == set(params.STAGES)


def test_shared_sections_have_the_same_smoke_values_in_every_notebook():
    seen = {}
    for stage, spec in params.STAGES.items():
        nb = pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb"))
        for section in spec["sections"][1:]:
            for key in params.SCHEMA[section]:
                value = nb[f"{section}_{key}"]["default"]
                assert seen.setdefault((section, key), value) == value, (stage, section, key)


def _broken(mutate):
    p = copy.deepcopy(PARAMS)
    mutate(p)
    return p


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p["aisp"].pop("sigma"), "missing key aisp.sigma"),
    (lambda p: p["aisp"].update(sigma=-0.1), "aisp.sigma must be > 0"),
    (lambda p: p["aisp"].update(alpha=2), r"aisp.alpha must be >= 0 and <= 1"),
    (lambda p: p["aisp"].update(n="eight"), "aisp.n must be an integer"),
    (lambda p: p["aisp"].update(alpha_mode="both"), "aisp.alpha_mode must be one of"),
    (lambda p: p["aisp"].update(sigmaa=1), "unknown key.*aisp.sigmaa"),
    (lambda p: p["bon"].update(budgets=[1, 64]), "exceed bon.max_samples"),
    (lambda p: p["generation"].update(decode="beam"), "generation.decode must be one of"),
    (lambda p: p.pop("model"), "no section 'model'"),
])
def test_bad_values_name_the_key(mutate, match):
    with pytest.raises(ParameterError, match=match):
        params.stage_parameters("aisp" if "bon" not in match else "bon", _broken(mutate))


def test_cli_stops_before_writing_and_keeps_previous_output(tmp_path):
    bad = _broken(lambda p: p["aisp"].update(tau=-3))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "results" / "aisp" / "params.yaml"
    out.parent.mkdir(parents=True)
    out.write_text("previous: true\n")
    proc = subprocess.run([sys.executable, "-m", "prelogit.params", "aisp", "--params", "params.yaml"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "aisp.tau must be >= 0" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "previous: true\n"
    assert [p.name for p in out.parent.iterdir()] == ["params.yaml"]  # no temporary file left behind


def test_malformed_yaml_is_reported(tmp_path):
    (tmp_path / "params.yaml").write_text("aisp: [sigma: 1\n")
    proc = subprocess.run([sys.executable, "-m", "prelogit.params", "aisp"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_cli_writes_the_flat_parameters(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    proc = subprocess.run([sys.executable, "-m", "prelogit.params", "bon"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    flat = yaml.safe_load((tmp_path / "results" / "bon" / "params.yaml").read_text())
    assert flat == params.stage_parameters("bon", PARAMS)
    assert flat["budgets"] == PARAMS["bon"]["budgets"] and flat["model_name"] == PARAMS["model"]["name"]


def test_notebook_check_sees_smoke_values():
    nb = pm.inspect_notebook(str(ROOT / "notebooks" / "aisp.ipynb"))
    ns = {k: eval(v["default"]) for k, v in nb.items()}  # the parameters cell holds literals only
    params.check_notebook("aisp", ns)
    ns["sigma"] = 0
    with pytest.raises(ParameterError, match="aisp.sigma"):
        params.check_notebook("aisp", ns)

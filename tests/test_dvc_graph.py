"""dvc.yaml describes what the pipeline runs and writes, and the committed results keep its rules.

- each stage's code deps are exactly the import closure of what its command runs (prelogit.deps);
- every file committed under results/ has exactly one producing stage, and every declared output
  is committed;
- timing lives only in timing.json files, and metrics.json holds a handful of headline numbers;
- every PNG a stage writes is the image its executed notebook displays.

Fast: reads files, loads no model. The last four describe the committed results, so they fail
until the pipeline is re-run after a change of those rules (its failures name the files).
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from prelogit import deps, io

ROOT = Path(__file__).resolve().parents[1]
STAGES: dict[str, dict] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
#: Folders under results/ that git ignores: a smoke run's outputs and a stage's work in progress.
IGNORED = ("results/_smoke/", "results/.staging/")


def _declared(spec: dict) -> list[str]:
    """Every path a stage declares it writes: its outs, metrics and plots."""
    return [path for kind in ("outs", "metrics", "plots") for entry in spec.get(kind, [])
            for path in (entry if isinstance(entry, dict) else {entry: None})]


def _tracked_results() -> list[str]:
    out = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


# -- code deps ------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_import_closure(stage):
    want = set(deps.entry_files(stage, ROOT, STAGES)) | set(deps.code_deps(stage, ROOT, STAGES))
    have = deps.declared_code(STAGES[stage])
    assert not want - have, f"dvc.yaml stage {stage} runs but does not list {sorted(want - have)}"
    assert not have - want, (f"dvc.yaml stage {stage} lists {sorted(have - want)}, which it does not run "
                             f"(python -m prelogit.deps {stage} prints what it does)")


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _notebook(*cells: str) -> str:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# demo")]
                                  + [nbformat.v4.new_code_cell(c) for c in cells])
    return nbformat.writes(nb)


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """A repository with its own small ``prelogit`` package, a notebook stage and a script stage."""
    _write_package(tmp_path, {
        "src/prelogit/__init__.py": '"""Docstring and a version only: not listed."""\n__version__ = "0"\n',
        # the wrapper every notebook stage runs: a relative import of a module
        "src/prelogit/stage.py": "from . import wrapper_helper\n",
        "src/prelogit/wrapper_helper.py": "import os\n",
        # imported by the notebook; imports inside a function count, two levels of relative import
        "src/prelogit/a.py": "def f():\n    from .sub.c import thing\n    return thing\n",
        "src/prelogit/sub/__init__.py": "from . import d  # a package __init__ that imports: listed\n",
        "src/prelogit/sub/c.py": "from ..b import value\nthing = value\n",
        "src/prelogit/sub/d.py": "",
        "src/prelogit/b.py": "value = 1\n",
        "src/prelogit/e.py": "import prelogit.f\n",
        "src/prelogit/f.py": "",
        "src/prelogit/unused.py": "import prelogit.b\n",
        "src/prelogit/for_script.py": "from prelogit import __version__\n",
        # `from prelogit import a, e`: two submodules; a magic must not break the parse
        "notebooks/demo.ipynb": _notebook("%matplotlib inline\nfrom prelogit import a, e", "import numpy as np"),
        "bench.py": "import sys\nfrom prelogit.for_script import __version__\n",
        "dvc.yaml": yaml.safe_dump({"stages": {
            "demo": {"cmd": "python -m prelogit.stage demo",
                     "deps": ["notebooks/demo.ipynb", "results/x.json", "src/prelogit/a.py",
                              "src/prelogit/unused.py"]},
            "bench": {"cmd": "python bench.py --out results/bench.json", "frozen": True,
                      "deps": ["bench.py", "src/prelogit/for_script.py", "src/prelogit/__init__.py"]},
        }}),
    })
    return tmp_path


def test_closure_of_a_synthetic_package(toy_repo):
    assert deps.code_deps("demo", toy_repo) == [
        "src/prelogit/a.py", "src/prelogit/b.py", "src/prelogit/e.py", "src/prelogit/f.py", "src/prelogit/stage.py",
        "src/prelogit/sub/__init__.py", "src/prelogit/sub/c.py", "src/prelogit/sub/d.py",
        "src/prelogit/wrapper_helper.py"]
    assert deps.entry_files("demo", toy_repo) == ["notebooks/demo.ipynb"]
    # a name taken from the package's __init__.py makes that file a dep, even without imports of its own
    assert deps.code_deps("bench", toy_repo) == ["src/prelogit/__init__.py", "src/prelogit/for_script.py"]


def test_check_names_missing_and_extra_modules(toy_repo, capsys):
    problems = deps.check(root=toy_repo)
    assert problems == {"demo": {
        "missing": ["src/prelogit/b.py", "src/prelogit/e.py", "src/prelogit/f.py", "src/prelogit/stage.py",
                    "src/prelogit/sub/__init__.py", "src/prelogit/sub/c.py", "src/prelogit/sub/d.py",
                    "src/prelogit/wrapper_helper.py"],
        "extra": ["src/prelogit/unused.py"]}}
    assert deps.main(["--check", "--root", str(toy_repo)]) == 1
    out = capsys.readouterr().out
    assert "demo: missing src/prelogit/sub/c.py" in out and "demo: extra src/prelogit/unused.py" in out
    assert "bench:" not in out
    assert deps.main(["--check", "--root", str(toy_repo), "bench"]) == 0


def test_unknown_command_is_an_error():
    with pytest.raises(ValueError, match="cannot tell what"):
        deps.entry_points("bash run.sh")


# -- producers -------------------------------------------------------------------------------

def test_every_committed_result_has_exactly_one_producer():
    producers = Counter(path for spec in STAGES.values() for path in _declared(spec))
    twice = sorted(p for p, n in producers.items() if n > 1)
    assert not twice, f"declared by more than one stage: {twice}"
    orphans = [f for f in _tracked_results() if f not in producers]
    assert not orphans, f"committed under results/ but no stage of dvc.yaml writes them (git rm them?): {orphans}"


def test_every_plot_is_a_stage_output():
    """dvc.yaml's top-level plots show files that a stage writes."""
    declared = {path for spec in STAGES.values() for path in _declared(spec)}
    files = []
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots", []):
        if isinstance(entry, str):
            files.append(entry)
        else:
            for spec in entry.values():
                files += list(spec["y"]) if isinstance(spec.get("y"), dict) else []
    assert files and not set(files) - declared, sorted(set(files) - declared)


def test_every_declared_output_is_committed():
    tracked = set(_tracked_results())
    missing = sorted(p for spec in STAGES.values() for p in _declared(spec)
                     if p not in tracked and not p.startswith(IGNORED))
    assert not missing, f"declared in dvc.yaml but not committed (re-run the pipeline and commit them): {missing}"


# -- the committed results' contents -----------------------------------------------------------

def _timing_keys(obj: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every timing key (io.is_timing_key) in a JSON value, at any depth."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if io.is_timing_key(key):
                yield f"{prefix}{key}"
            yield from _timing_keys(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _timing_keys(value, f"{prefix}{i}.")


def _json_values(path: Path) -> list[Any]:
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else [json.loads(text)]


def test_timing_only_in_timing_json():
    found = {}
    for name in _tracked_results():
        path = ROOT / name
        if path.suffix not in (".json", ".jsonl") or path.name == io.TIMING_FILE or not path.exists():
            continue
        # the sampling benchmark's file is a timing measurement as a whole (ratios of wall clocks, with
        # the raw seconds beside them): its frozen stage never re-runs with the pipeline
        if name.startswith("results/benchmarks/"):
            continue
        keys = sorted({k for value in _json_values(path) for k in _timing_keys(value)})
        if keys:
            found[name] = keys[:5] + (["..."] if len(keys) > 5 else [])
    assert not found, f"timing keys outside {io.TIMING_FILE} (a faithful re-run would change these files): {found}"


def test_headline_metrics_are_few():
    big = {}
    for path in sorted((ROOT / "results").glob("*/metrics.json")):
        leaves = io._leaves(json.loads(path.read_text()))  # counted as write_stage_metrics counts them
        if len(leaves) > io.MAX_HEADLINE:
            big[str(path.relative_to(ROOT))] = len(leaves)
    assert not big, f"more than {io.MAX_HEADLINE} values in (details belong in summary.json): {big}"


def _notebook_pngs(path: Path) -> list[bytes]:
    nb = nbformat.read(str(path), as_version=4)
    return [base64.b64decode(output["data"]["image/png"])
            for cell in nb.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


@pytest.mark.parametrize("stage", sorted(s for s, spec in STAGES.items()
                                         if any(p.endswith(".png") for p in _declared(spec))))
def test_every_png_is_shown_in_the_executed_notebook(stage):
    executed = ROOT / "results" / stage / f"{stage}.ipynb"
    shown = _notebook_pngs(executed)
    pngs = [p for p in _declared(STAGES[stage]) if p.endswith(".png")]
    absent = [p for p in pngs if not (ROOT / p).exists()]
    assert not absent, f"stage {stage} declares {absent} but they do not exist"
    unshown = [p for p in pngs if (ROOT / p).read_bytes() not in shown]
    assert not unshown, (f"{executed.relative_to(ROOT)} does not display the saved bytes of {unshown} "
                         f"(show them with prelogit.nbtools.show_figure)")

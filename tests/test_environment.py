"""pyproject.toml and environment.yml pin the same dependencies; the asset packages are pinned."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = {_norm(r) for r in pip_section if not r.startswith("-e")}
    assert {_norm(r) for r in project["dependencies"]} == conda_pins
    assert "python=3.11" in env["dependencies"]


def test_every_dependency_is_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assets = [line for line in (ROOT / "requirements-assets.txt").read_text().splitlines() if line and not line.startswith("#")]
    for req in project["dependencies"] + assets:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.\-]*", req.strip()), req

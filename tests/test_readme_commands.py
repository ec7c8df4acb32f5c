"""The README's set-up and pipeline commands work as written, from a shell with nothing activated.

The commands are read from the bash blocks of the README's "Two commands" section (not copied
here), turned into their dry-run forms (``make repro`` gets ``DRY=1``, ``dvc repro`` gets
``--dry``, other make targets run as ``make -n``) and run block by block, each block in one bash
as a user would paste it, in a copy of the working tree (the checkout's ``.venv`` linked in, so
the Makefile's stamp finds everything installed and nothing is installed again) with
``PATH=/usr/local/bin:/usr/bin:/bin``, ``HOME`` and the offline variables only. This is what
caught ``.venv/bin/dvc repro --force``: DVC starts each stage as ``python -m prelogit.stage``,
which resolves ``python`` on ``PATH``, so only ``make`` (which puts ``.venv/bin`` first) or an
activated venv can run it.

Every Python process started here loads ``tests/netguard`` (a connection off the machine is
refused and logged), as in tests/test_pipeline.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prelogit import params

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
#: make targets that are quick and change nothing outside the copy: run as written
RUN_AS_IS = {"setup", "readme"}


def section_commands() -> list[list[str]]:
    """The command lines of each bash block in the README's "Two commands" section, comments dropped."""
    text = README.read_text()
    assert "\n## Two commands\n" in text, "the README has no 'Two commands' section"
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    commands = [[re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()
                 if line.strip() and not line.strip().startswith("#")] for block in blocks]
    assert commands and all(commands), "no commands found in the 'Two commands' section"
    return commands


def python311() -> str | None:
    """``PYTHON=`` for make when ``python3.11`` is not on the clean PATH (only used if the venv must be built)."""
    if shutil.which("python3.11", path=CLEAN_PATH):
        return None
    found = shutil.which("python3.11")
    if found is None and sys.version_info[:2] == (3, 11):
        found = getattr(sys, "_base_executable", sys.executable)
    return found


def dry(command: str, python: str | None) -> str:
    """``command`` as it may run in a test: nothing long, nothing outside the copy changed."""
    words = shlex.split(command)
    if words[0] == "make":
        target = next((w for w in words[1:] if "=" not in w and not w.startswith("-")), "")
        extra = [f"PYTHON={python}"] if python else []
        if target == "repro":
            return shlex.join(words + ["DRY=1"] + extra)
        if target in RUN_AS_IS:
            return shlex.join(words + extra)
        return shlex.join(["make", "-n"] + words[1:] + extra)  # make test etc.: print the recipe only
    if words[:2] == ["dvc", "repro"]:
        return shlex.join(words + ["--dry"])
    if words[0] in (".", "source") or words[:3] == ["python", "-m", "prelogit.report"]:
        return command  # activation; the README block renders from results/ in seconds (into the copy)
    raise AssertionError(f"no dry-run form for the README command {command!r}: add one to tests/test_readme_commands.py")


def copy_worktree(dest: Path) -> Path:
    """The working tree as a fresh clone would have it (tracked and untracked-but-not-ignored files,
    results/ and dvc.lock included), a git repository, with the checkout's installed .venv linked in."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)  # mtimes kept: the venv's stamp stays newer than pyproject.toml
    (dest / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (ROOT / ".venv" / "bin" / ".installed").exists():
        pytest.skip("no installed .venv (make setup) to link into the copy")
    return copy_worktree(tmp_path_factory.mktemp("readme") / "repo")


@pytest.fixture(scope="module")
def clean_env(clone) -> dict[str, str]:
    """Nothing activated: the system PATH, HOME and the offline variables (plus the netguard)."""
    env = {"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", str(clone.parent)), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "LANG": "C.UTF-8",
           "PYTHONPATH": str(ROOT / "tests" / "netguard"), "PRELOGIT_NETGUARD": "1",
           "PRELOGIT_NETGUARD_LOG": str(clone.parent / "netguard.log")}
    stamp = subprocess.run(["make", "-q", "setup"], cwd=clone, env=env, capture_output=True, text=True)
    if stamp.returncode != 0:  # make repro would reinstall (pyproject.toml is newer): not this test's job
        pytest.skip("the .venv is older than pyproject.toml or requirements-assets.txt: run `make setup` first")
    return env


def missing_outputs(repo: Path) -> list[str]:
    """Every output, metric or plot file dvc.yaml declares that ``repo`` lacks."""
    missing = []
    for spec in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if not (repo / path).exists():
                    missing.append(path)
    return missing


def test_a_fresh_clone_has_every_output_dvc_yaml_declares(clone):
    """What "make repro on a fresh clone reports that everything is up to date" needs (and what
    ``dvc repro --dry`` needs at all: it fails on a missing output that an earlier stage would write)."""
    missing = missing_outputs(clone)
    assert not missing, f"results/ lacks {len(missing)} declared output(s), re-run the pipeline: {missing}"


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # a few seconds per block: DVC builds the whole graph, the report renders
@pytest.mark.parametrize("block", range(len(section_commands())))
def test_readme_commands_run_as_written_from_a_clean_shell(block, clone, clean_env):
    if missing_outputs(clone):  # reported once, by the test above, not once per block
        pytest.skip("results/ lacks outputs dvc.yaml declares (see test_a_fresh_clone_has_every_output_dvc_yaml_declares)")
    commands = section_commands()[block]
    script = "\n".join(dry(c, python311()) for c in commands)
    run = _bash(script, clone, clean_env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"README block {block}:\n{script}\n--- output ---\n{out[-4000:]}"
    if any("FORCE=1" in c or "--force" in c for c in commands if "repro" in c):
        for stage in params.stages(ROOT):  # dvc printed every stage's command, which would run them all
            assert f"Running stage '{stage}'" in run.stdout and f"> python -m prelogit.stage {stage}" in run.stdout, out
    for c in commands:
        if shlex.split(c)[:2] == ["make", "test"]:  # printed, not run: the recipe names the venv's tools
            assert ".venv/bin/python -m pytest" in run.stdout, out
    log = clone.parent / "netguard.log"
    assert not log.exists() or log.read_text() == "", log.read_text()


def test_the_readme_names_no_command_that_needs_an_activated_venv_outside_it():
    """A bare ``.venv/bin/dvc repro`` cannot run a stage; the section says so but never suggests it."""
    for commands in section_commands():
        assert not any(c.startswith(".venv/bin/dvc repro") for c in commands)
        if any(c.split()[0] in ("dvc", "python", "pytest", "jupyter") for c in commands):
            assert commands[0] == ". .venv/bin/activate", f"activate the venv first in {commands}"


def test_make_gives_the_stage_commands_the_venvs_python(clone, clean_env):
    """What --dry cannot show: the ``python`` that DVC's stage commands find under make is the
    venv's and imports prelogit (DVC passes its environment on to the stage's shell)."""
    probe = "probe: ; @python -c 'import prelogit, sys; print(sys.prefix)'"
    run = subprocess.run(["make", "-s", "--eval", probe, "probe"], cwd=clone, env=clean_env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Path(run.stdout.strip()).resolve() == (ROOT / ".venv").resolve()

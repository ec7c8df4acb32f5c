"""The README quotes only numbers rendered from results/, and its example runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from prelogit import report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_results_block_is_rendered_from_the_results_files():
    assert report.readme_block(README) == report.render_readme_block(ROOT / "results"), (
        "README's results block is stale: run `python -m prelogit.report --update-readme`")


def test_readme_results_block_holds_the_only_numbers_about_results():
    """Outside the generated block, the README states no measured reward (a +/- decimal)."""
    text = README.read_text()
    outside = text.replace(report.readme_block(README), "")
    assert not re.search(r"[+-]\d+\.\d{2}\b", outside)


@pytest.mark.integration
def test_readme_example_runs(tmp_path):
    code = re.search(r"A short example.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "AISP" in line and "best-of-32" in line]
    assert len(lines) == 3

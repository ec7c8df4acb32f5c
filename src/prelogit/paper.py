"""The paper's scale, one command away: ``python -m prelogit.paper`` (or ``make paper``).

``--params params-gpu.yaml --name embedded-gpu`` (``make gpu``) runs the embedded default with every
test prompt to N = 256 on a CUDA GPU the same way. A parameter file may hold only some sections;
the others are params.yaml's.

Reads ``params-paper.yaml`` (7-8B chat model, HH-RLHF prompts, a 7-8B reward model, 128 new
tokens), checks BEFORE anything heavy that the machine can run it -- a CUDA GPU if a section asks
for one, the ``datasets`` package for hub data, and hub access for every model and data set named
-- and then runs the pipeline as a DVC experiment with those parameters
(``dvc exp run -n paper-scale -S section.key=value ...``). A missing GPU, package or hub access is
reported as one message per problem and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from . import params as P
from .checks import ParameterError


def _is_local(name: str | None) -> bool:
    return name is None or name == "embedded" or Path(name).expanduser().exists()


def preflight(cfg: dict, check_hub: bool = True) -> list[str]:
    """Problems that would stop the paper-scale run, each with its fix; empty when all is well."""
    problems = []
    for section in P.SCHEMA:
        if section in cfg:
            try:
                P.validate_section(cfg, section)
            except ParameterError as err:
                problems.append(str(err))
    devices = {cfg.get("model", {}).get("device", "cpu")}
    if any(str(d).startswith("cuda") for d in devices):
        import torch

        if not torch.cuda.is_available():
            problems.append("model.device is cuda but no CUDA GPU is visible: run on a machine with a GPU "
                            "(the paper's 7-8B models need about 16 GB of GPU memory in bf16)")
    source = cfg.get("prepare", {}).get("source_path")
    if source and not _is_local(source) and importlib.util.find_spec("datasets") is None:
        problems.append(f"prepare.source_path {source!r} is a hub data set: pip install datasets")
    if check_hub:
        names = [("model.name", cfg.get("model", {}).get("name"), "model"),
                 ("reward.name", cfg.get("reward", {}).get("name") if cfg.get("reward", {}).get("kind") == "hf" else None, "model"),
                 ("prepare.source_path", source, "dataset")]
        for key, name, kind in names:
            if _is_local(name):
                continue
            try:
                from huggingface_hub import HfApi

                api = HfApi()
                (api.model_info if kind == "model" else api.dataset_info)(name, timeout=15)
            except Exception as err:  # any failure to reach or read the hub is the same problem to the user
                problems.append(f"{key} {name!r}: the Hugging Face hub cannot be reached or refuses access "
                                f"({type(err).__name__}). Check the network, unset HF_HUB_OFFLINE, log in "
                                "(huggingface-cli login) for gated models, or point it at a local folder")
    return problems


def overrides(default: dict, paper: dict) -> list[str]:
    """``-S section.key=value`` arguments for every value that differs from params.yaml."""
    out = []
    for section, values in paper.items():
        for key, value in values.items():
            if default.get(section, {}).get(key) != value:
                out += ["-S", f"{section}.{key}={json.dumps(value)}"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the pipeline at the paper's scale as a DVC experiment")
    ap.add_argument("--params", default="params-paper.yaml")
    ap.add_argument("--check-only", action="store_true", help="only run the preflight checks")
    ap.add_argument("--no-hub-check", action="store_true")
    ap.add_argument("--name", default="paper-scale", help="the DVC experiment's name")
    args = ap.parse_args(argv)
    try:
        paper, default = P.load(args.params), P.load("params.yaml")
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = preflight(paper, check_hub=not args.no_hub_check)
    if problems:
        print("The paper-scale run cannot start here:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if args.check_only:
        print("preflight passed")
        return 0
    cmd = ["dvc", "exp", "run", "-n", args.name, *overrides(default, paper)]
    print(" ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

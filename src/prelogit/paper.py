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

``--num_processes N`` shares each generating stage's prompts out over N processes (one per GPU)
with ``accelerate launch`` (params.yaml's ``launch`` section, :mod:`prelogit.launch`);
``--config_file`` names accelerate's configuration instead. A missing configuration file or fewer
GPUs than processes is a preflight problem like the others.

A model too large for one GPU: when ``model.device`` is cuda and the model's weights (with a margin,
:data:`FIT_MARGIN`) exceed one GPU's memory but fit in all visible GPUs together, the run gets
``model.device_map: auto`` (the model spread over the GPUs) and one process; if they do not fit
even in all of them, that is a preflight problem (:func:`device_map_decision`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from . import launch
from . import params as P
from .checks import ParameterError

#: Weights x FIT_MARGIN must fit in GPU memory: the weights are not all a generating stage keeps on
#: the GPU. The activations of one forward pass, the logits (rows x vocabulary) and CUDA's own
#: context take more, 20 % being the usual rule of thumb for inference. The KV cache comes on top
#: and grows with ``model.max_rows``: Llama-3-8B's is 128 KiB per token in bf16, so 64 rows of
#: 512 + 128 tokens hold about 5 GB while all are running. A run that still runs out of GPU memory
#: needs a smaller model.max_rows, not another device map.
FIT_MARGIN = 1.2

GB = 1e9


def _is_local(name: str | None) -> bool:
    return name is None or name == "embedded" or Path(name).expanduser().exists()


def preflight(cfg: dict, check_hub: bool = True) -> list[str]:
    """Problems that would stop the paper-scale run, each with its fix; empty when all is well.

    ``cfg`` is the configuration the run will have (params.yaml overlaid with the paper file and the
    command line, :func:`overlay`); a ``launch`` section in it is checked for this machine too
    (:func:`prelogit.launch.problems`: accelerate's configuration file, enough GPUs).
    """
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
    if "launch" in cfg:
        # launch.problems re-validates the section; a malformed one is already reported above
        problems += [p for p in launch.problems(cfg) if p not in problems]
    return problems


def _weight_files(files: dict[str, int]) -> int | None:
    """Bytes of the weight files among ``{top-level file name: size}``: the *.safetensors ones, else the
    *.bin ones (repositories that ship both formats hold the same weights twice); None without any."""
    for suffix in (".safetensors", ".bin"):
        sizes = [size for name, size in files.items() if name.endswith(suffix)]
        if sizes:
            return sum(sizes)
    return None


def _sizes(folder: Path) -> dict[str, int]:
    """``{file name: bytes}`` of the files directly in ``folder`` (stat() follows the HF cache's symlinks)."""
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def _cached_snapshot(name: str) -> Path | None:
    """The folder of hub id ``name`` in the local Hugging Face cache, or None when it is not there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id: nothing can be cached under it
        return None
    return Path(config).parent if isinstance(config, str) else None


def model_bytes(name: str | None, check_hub: bool = True) -> int | None:
    """Bytes of a model's weight files (about its size in GPU memory in the dtype it is stored in); None if unknown.

    A local folder: its top-level *.safetensors (else *.bin) files. A hub id: the same files of its
    copy in the local Hugging Face cache, else (only with ``check_hub``) the sizes the hub lists
    (``HfApi().model_info(files_metadata=True)``). ``embedded`` (135M parameters) is None: it fits
    any GPU. Only top-level files count: ``from_pretrained`` reads no others (Llama 3's hub
    repositories also hold the original checkpoint under ``original/``).
    """
    if not name or name == "embedded":
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        return _weight_files(_sizes(local))
    cached = _cached_snapshot(name)
    found = _weight_files(_sizes(cached)) if cached is not None else None
    if found is not None or not check_hub:
        return found
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(name, files_metadata=True, timeout=15)
    except Exception:  # unreachable or refused: preflight's hub check reports it
        return None
    return _weight_files({s.rfilename: s.size for s in info.siblings or []
                          if "/" not in s.rfilename and s.size is not None})


def device_map_decision(weights: int | None, gpus: list[int], num_processes: int) -> tuple[str | None, str | None]:
    """``(device_map, problem)`` for a model of ``weights`` bytes on GPUs of ``gpus`` bytes each.

    Each of ``num_processes`` processes holds a whole model on its own GPU, so the model must fit the
    smallest of the first ``num_processes`` GPUs (with :data:`FIT_MARGIN`): then ``(None, None)``.
    If it does not but fits in all GPUs together, ``("auto", None)``: one process, the model spread
    over every GPU (the caller sets one process). If it does not fit even there, ``(None, problem)``.
    Unknown weights or no GPU: ``(None, None)``, nothing to decide.
    """
    if weights is None or not gpus:
        return None, None
    need = weights * FIT_MARGIN
    one = min(gpus[:max(1, num_processes)])
    if need <= one:
        return None, None
    if need <= sum(gpus):
        return "auto", None
    return None, (f"model.name's weights ({weights / GB:.1f} GB, {need / GB:.1f} GB with activations and KV cache) do "
                  f"not fit in the {len(gpus)} visible GPU(s) ({sum(gpus) / GB:.1f} GB together): use more or larger "
                  "GPUs, a smaller model, or a smaller model.dtype (bfloat16 halves float32)")


def gpu_memories() -> list[int]:
    """Total memory in bytes of each visible CUDA GPU; [] without one."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def plan_device_map(cfg: dict, check_hub: bool = True) -> tuple[dict, str | None, str | None]:
    """``(changes, note, problem)``: what :func:`device_map_decision` asks of the run ``cfg`` describes.

    ``changes`` (``{section: {key: value}}``) sets ``model.device_map: auto`` and one process when the
    model needs several GPUs; ``note`` says so in one line. Nothing is decided when ``model.device``
    is not cuda or ``model.device_map`` is already set (the user chose). The weights are counted as
    stored (:func:`model_bytes`); a model.dtype wider than the checkpoint's (float32 from bf16 files)
    would need twice that, which is not accounted for.
    """
    model = cfg["model"] if isinstance(cfg.get("model"), dict) else {}
    if not str(model.get("device", "cpu")).startswith("cuda") or model.get("device_map") is not None:
        return {}, None, None
    gpus = gpu_memories()
    nproc = cfg["launch"].get("num_processes", 1) if isinstance(cfg.get("launch"), dict) else 1
    nproc = nproc if isinstance(nproc, int) and nproc >= 1 else 1  # a bad value is reported by preflight
    name = model.get("name")
    weights = model_bytes(name, check_hub) if gpus and isinstance(name, str) else None
    device_map, problem = device_map_decision(weights, gpus, nproc)
    if device_map is None:
        return {}, None, problem
    assert weights is not None  # device_map_decision spreads a model only when its size is known
    changes: dict[str, dict[str, object]] = {"model": {"device_map": device_map}}
    if nproc != 1:
        changes["launch"] = {"num_processes": 1}
    note = (f"model {model.get('name')!r} ({weights / GB:.1f} GB of weights, {weights * FIT_MARGIN / GB:.1f} GB with "
            f"activations) does not fit one GPU ({min(gpus[:nproc]) / GB:.1f} GB): model.device_map: auto spreads it "
            f"over the {len(gpus)} visible GPUs, in one process" + (f" (instead of {nproc})" if nproc != 1 else ""))
    return changes, note, None


def overlay(base: dict, top: dict) -> dict:
    """``base`` with each section's keys replaced by ``top``'s, section by section (a deep copy)."""
    out = copy.deepcopy(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(copy.deepcopy(values))
        else:
            out[section] = copy.deepcopy(values)
    return out


def cli_choices(num_processes: int | None, config_file: str | None) -> dict:
    """The ``launch`` keys ``--num_processes`` and ``--config_file`` set, as a section overlay; {} without them.

    Either option runs the generating stages under accelerate launch; the keys not given keep the
    paper file's values, else params.yaml's.
    """
    if num_processes is None and config_file is None:
        return {}
    chosen: dict = {"launcher": "accelerate"}
    if num_processes is not None:
        chosen["num_processes"] = num_processes
    if config_file is not None:
        chosen["config_file"] = config_file
    return {"launch": chosen}


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
    ap.add_argument("--num_processes", type=int, default=None,
                    help="share each generating stage's prompts out over N processes with accelerate launch "
                         "(one per GPU; launch.launcher: accelerate, launch.num_processes: N)")
    ap.add_argument("--config_file", default=None,
                    help="accelerate configuration file for the launch ('default': the one `accelerate config` "
                         "writes); without it prelogit passes every launch option itself")
    args = ap.parse_args(argv)
    try:
        paper, default = P.load(args.params), P.load("params.yaml")
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    check_hub = not args.no_hub_check
    # The run's parameters: the paper file, then the command line, then what the model's size asks for.
    paper = overlay(paper, cli_choices(args.num_processes, args.config_file))
    changes, note, fit_problem = plan_device_map(overlay(default, paper), check_hub)
    paper = overlay(paper, changes)
    problems = preflight(overlay(default, paper), check_hub=check_hub) + ([fit_problem] if fit_problem else [])
    if problems:
        print("The paper-scale run cannot start here:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if note:
        print(note)
    if args.check_only:
        print("preflight passed")
        return 0
    cmd = ["dvc", "exp", "run", "-n", args.name, *overrides(default, paper)]
    print(" ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

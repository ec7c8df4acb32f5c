"""``params.yaml``: its schema, its validation and the parameters each pipeline stage injects.

:data:`SCHEMA` checks every key of every section (presence, type, range) and
:func:`check_across_sections` the keys that constrain one another; an error names the key and the
fix. :func:`stages` reads from ``dvc.yaml`` which sections each stage reads (its DVC ``params``) and
which paths it is handed (its ``meta.paths``, each one of its deps), so nothing about a stage is declared
twice; :func:`stage_parameters` turns them into the parameters papermill injects into
``notebooks/STAGE.ipynb``, exactly matching its ``parameters`` cell: each section the stage reads as one
mapping named after it (``aisp``, ``model``, ``generation``, ...), plus the paths the stage reads and
writes. DVC tracks those same sections, so a changed ``aisp.N`` re-runs aisp and figures and nothing else.
A notebook re-checks what it was given with :func:`check_notebook`, which returns the sections typed
(``p.aisp.N``, ``p.model.dtype``).

What a stage checks before it starts beyond the values (this machine, the earlier stages' files, how
it is launched) and the command line that writes the injected file live in :mod:`prelogit.preflight`,
which imports this module; this one imports neither it nor :mod:`prelogit.launch`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType, SimpleNamespace
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, cast

import yaml

from .checks import ParameterError, check_choice, check_device, check_number

Check = Callable[[str, Any], None]


def num(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Check:
    return lambda name, v: check_number(name, v, low=low, high=high, low_open=low_open, high_open=high_open)


def integer(low: float | None = None, high: float | None = None) -> Check:
    return lambda name, v: check_number(name, v, low=low, high=high, integer=True)


def choice(*options: str) -> Check:
    return lambda name, v: check_choice(name, v, options)


def string(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ParameterError(f"{name} must be a non-empty string, got {v!r}")


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ParameterError(f"{name} must be true or false, got {v!r}")


def list_of(item: Check, min_len: int = 1) -> Check:
    def check(name: str, v: Any) -> None:
        if not isinstance(v, list) or len(v) < min_len:
            raise ParameterError(f"{name} must be a list of at least {min_len} item(s), got {v!r}")
        for i, x in enumerate(v):
            item(f"{name}[{i}]", x)
    return check


def optional(inner: Check) -> Check:
    return lambda name, v: None if v is None else inner(name, v)


POS = num(0, low_open=True)
UNIT = num(0, 1)
SEED = integer(0)


def tau_value(name: str, v: Any) -> None:
    """A number of controlled tokens, or ``full`` (every generated token)."""
    if v != "full":
        integer(0)(name, v)


#: Keys of one AISP arm of the tune stage (see :mod:`prelogit.tune`) and their checks.
ARM_KEYS: dict[str, Check] = {"sigma_rms": POS, "lam": POS, "lam_mode": choice("absolute", "std"), "alpha": UNIT,
                              "alpha_mode": choice("mppi", "step"), "tau": tau_value, "n": integer(1),
                              "decode": choice("sample", "greedy")}


def mapping_of(keys: dict[str, Check], extra: tuple[str, ...] = ()) -> Check:
    """A check of a mapping with exactly ``keys`` (each checked) plus, optionally, the ``extra`` keys."""
    def check(name: str, v: Any) -> None:
        if not isinstance(v, dict):
            raise ParameterError(f"{name} must be a mapping with keys {', '.join(keys)}, got {v!r}")
        missing, unknown = sorted(set(keys) - set(v)), sorted(set(v) - set(keys) - set(extra))
        if missing or unknown:
            raise ParameterError(f"{name}: " + "; ".join(x for x in (
                f"missing key(s) {', '.join(missing)}" if missing else "",
                f"unknown key(s) {', '.join(unknown)}" if unknown else "") if x))
        for key, check_key in keys.items():
            check_key(f"{name}.{key}", v[key])
    return check


#: An AISP arm as params.yaml gives it (tune.center): every factor but the decoding given V, which
#: is a reading (tune.readings) with a search of its own.
arm = mapping_of({k: v for k, v in ARM_KEYS.items() if k != "decode"})

#: Keys of one MISVO arm of the misvo stage's search (see :mod:`prelogit.misvo`) and their checks.
MISVO_ARM_KEYS: dict[str, Check] = {"eta": num(0, low_open=True), "lam": num(0), "K": integer(2),
                                    "fisher": choice("reference", "identity")}
misvo_arm = mapping_of(MISVO_ARM_KEYS)


#: Every section class, by its name in params.yaml, in the order the classes below are defined.
SECTIONS: dict[str, type[Section]] = {}


def key(check: Check) -> Any:
    """A section's key: a required dataclass field whose check travels in its metadata."""
    return field(metadata={"check": check})


class Section:
    """A params.yaml section as a frozen dataclass: its fields are the section's keys, in order, each with
    its type and its check. The schema (:data:`SCHEMA`) is derived from these classes, so a key is added,
    typed and checked in one place. ``Model.of(params)`` is the validated, typed section."""

    section: ClassVar[str]

    def __init_subclass__(cls, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section = section
        SECTIONS[section] = cls

    @classmethod
    def checks(cls) -> dict[str, Check]:
        """The section's keys, in order, with their checks."""
        return {f.name: f.metadata["check"] for f in fields(cast(Any, cls))}

    @classmethod
    def of(cls, params: dict) -> Self:
        """The section of ``params`` (the whole params.yaml mapping), checked by :func:`validate_section`."""
        return cls(**validate_section(params, cls.section))


@dataclass(frozen=True)
class Model(Section, section='model'):
    """The language model every generating stage loads, where it runs, and how many rows one forward pass takes."""

    name: str = key(string)
    dtype: str = key(choice('float32', 'bfloat16', 'float16', 'float64'))
    device: str = key(check_device)
    cache_dir: str = key(string)
    threads: int = key(integer(0))
    max_rows: int = key(integer(1))
    device_map: str | None = key(optional(choice('auto')))


@dataclass(frozen=True)
class Generation(Section, section='generation'):
    """How a continuation is decoded when no method overrides it: its length, sampling or greedy, temperature, top-k, top-p."""

    max_new_tokens: int = key(integer(1))
    decode: str = key(choice('sample', 'greedy'))
    temperature: float = key(POS)
    top_k: int = key(integer(0))
    top_p: float = key(num(0, 1, low_open=True))


@dataclass(frozen=True)
class Reward(Section, section='reward'):
    """The optimised reward: the embedded MiniLM sentiment head (trained by the prepare stage) or a hub reward model."""

    kind: str = key(choice('embedded', 'hf'))
    name: str | None = key(optional(string))
    dtype: str = key(choice('float32', 'bfloat16', 'float16'))


@dataclass(frozen=True)
class Prepare(Section, section='prepare'):
    """The prompts (source, split sizes, prompt length) and the embedded reward head's VADER-labelled training data."""

    seed: int = key(SEED)
    source: str = key(choice('chitchat', 'hh_rlhf', 'shp'))
    source_path: str | None = key(optional(string))
    n_train: int = key(integer(1))
    n_val: int = key(integer(0))
    n_test: int = key(integer(1))
    n_qa: int = key(integer(0))
    max_prompt_tokens: int = key(integer(8))
    reward_utterances: int = key(integer(50))
    reward_threshold: float = key(num(0, 1, low_open=True, high_open=True))
    reward_seed: int = key(SEED)


@dataclass(frozen=True)
class BestOfN(Section, section='bon'):
    """Best-of-N on the test prompts: the budgets of its curve, and an optional larger run on the first prompts."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    max_samples: int = key(integer(1))
    large_prompts: int = key(integer(0))
    large_samples: int = key(integer(1))
    budgets: list[int] = key(list_of(integer(1)))
    batch_size: int = key(integer(1))


@dataclass(frozen=True)
class Tune(Section, section='tune'):
    """The tuning search on the validation prompts: the centre arm, the one-factor values, the readings, random arms, the halving rungs; the held-out prompts and the claim checks."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    holdout_prompts: int = key(integer(0))
    N: int = key(integer(1))
    rms_samples: int = key(integer(1))
    center: dict[str, Any] = key(arm)
    sigma_rms: list[float] = key(list_of(POS, 0))
    lam_absolute: list[float] = key(list_of(POS, 0))
    lam_std: list[float] = key(list_of(POS, 0))
    alpha_mppi: list[float] = key(list_of(UNIT, 0))
    alpha_step: list[float] = key(list_of(UNIT, 0))
    tau: list[int | str] = key(list_of(tau_value, 0))
    n: list[int] = key(list_of(integer(1), 0))
    readings: list[str] = key(list_of(choice('sample', 'greedy')))
    n_random: int = key(integer(0))
    rungs: list[int] = key(list_of(integer(1)))
    eta: int = key(integer(2))
    claim_prompts: int = key(integer(0))


@dataclass(frozen=True)
class AISP(Section, section='aisp'):
    """AISP on the test prompts at the tuned arm (and its frozen-U twin); the large run; the literature arm's sweep; the variance study."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    N: int = key(integer(1))
    sigma: float | None = key(optional(POS))
    large_prompts: int = key(integer(0))
    large_N: int = key(integer(1))
    final_rollout: bool = key(boolean)
    lit_prompts: int = key(integer(0))
    lit_sigma: float = key(POS)
    lit_alpha: float = key(UNIT)
    lit_lams: list[float] = key(list_of(POS, 0))
    lit_n: int = key(integer(1))
    lit_tau: int | str = key(tau_value)
    variance_prompts: int = key(integer(0))
    variance_V: int = key(integer(2))
    variance_reps: int = key(integer(2))


@dataclass(frozen=True)
class Samplers(Section, section='samplers'):
    """The best non-adaptive sampler (temperature x top_p, or greedy given V ~ N(0, sigma^2 I)), chosen on the
    validation prompts by successive halving as AISP is, then run on the test prompts (:mod:`prelogit.samplers`)."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    N: int = key(integer(1))
    temperature: list[float] = key(list_of(POS, 0))
    top_p: list[float] = key(list_of(num(0, 1, low_open=True), 0))
    sigma_rms: list[float] = key(list_of(POS, 0))
    tau: int = key(integer(1))
    rungs: list[int] = key(list_of(integer(1)))
    eta: int = key(integer(2))
    test_prompts: int = key(integer(1))
    batch_size: int = key(integer(1))


@dataclass(frozen=True)
class MISVO(Section, section='misvo'):
    """MISVO, the strongest newer peer: its search on the validation prompts and its test run (:mod:`prelogit.misvo`).
    ``N`` here is the number of MISVO steps times K, the sample budget as everywhere else."""

    seed: int = key(SEED)
    val_prompts: int = key(integer(1))
    N: int = key(integer(2))
    center: dict[str, Any] = key(misvo_arm)
    eta: list[float] = key(list_of(num(0, low_open=True), 0))
    lam: list[float] = key(list_of(num(0), 0))
    K: list[int] = key(list_of(integer(2), 0))
    fisher: list[str] = key(list_of(choice('reference', 'identity'), 0))
    rungs: list[int] = key(list_of(integer(1)))
    halving: int = key(integer(2))
    n_prompts: int = key(integer(1))
    final_rollout: bool = key(boolean)


@dataclass(frozen=True)
class Launch(Section, section='launch'):
    """How the generating stages are started (read by the stage wrapper, not by the notebooks): one plain
    process, or accelerate launch with num_processes processes that share the prompts out."""

    launcher: str = key(choice('python', 'accelerate'))
    num_processes: int = key(integer(1))
    config_file: str | None = key(optional(string))


@dataclass(frozen=True)
class Theory(Section, section='theory'):
    """The closed-form checks on the Gaussian toy (Monte-Carlo tolerances, the ESS sweeps, the KL) and the
    gaussianity study of the real model's pre-logits."""

    seed: int = key(SEED)
    false_alarm: float = key(num(0, 1, low_open=True, high_open=True))
    sigma: float = key(POS)
    lam: float = key(POS)
    kappa: float = key(POS)
    offset: float = key(num(0))
    quad_curvatures: list[float] = key(list_of(num(0)))
    dims: list[int] = key(list_of(integer(1)))
    n_grid: list[int] = key(list_of(integer(2), 2))
    n_seeds: int = key(integer(2))
    iter_dim: int = key(integer(1))
    iter_n: int = key(integer(2))
    K: int = key(integer(1))
    alphas: list[float] = key(list_of(num(0, 1, high_open=True)))
    kl_samples: int = key(integer(10))
    lam_ratios: list[float] = key(list_of(POS))
    ess_n: int = key(integer(2))
    ess_dims: list[int] = key(list_of(integer(1)))
    ess_shift: float = key(num(0))
    ess_curvature: float = key(num(0))
    gauss_split: str = key(choice('train', 'val', 'test'))
    gauss_prompts: int = key(integer(1))
    gauss_samples: int = key(integer(1))
    gauss_max_new_tokens: int = key(integer(1))
    gauss_level: float = key(num(0, 1, low_open=True, high_open=True))
    gauss_qq_dims: int = key(integer(1))
    gauss_sigmas: list[float] = key(list_of(POS))


@dataclass(frozen=True)
class ARGS(Section, section='args'):
    """The ARGS baseline: reward-guided decoding with k candidates per token and weight w."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    k: int = key(integer(1))
    w: float = key(num(0))
    decode: str = key(choice('greedy', 'sample'))


@dataclass(frozen=True)
class REControl(Section, section='recontrol'):
    """The RE-Control baseline: a value network trained on the model's hidden states, then gradient steps at decoding."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    train_prompts: int = key(integer(2))
    samples_per_prompt: int = key(integer(1))
    holdout: float = key(num(0, 1, high_open=True))
    epochs: int = key(integer(1))
    lr: float = key(POS)
    batch_size: int = key(integer(1))
    hidden: int = key(integer(1))
    layers: int = key(integer(1))
    step_size: float = key(num(0))
    n_steps: int = key(integer(0))


@dataclass(frozen=True)
class Transfer(Section, section='transfer'):
    """The second prompt distribution (prepare.n_qa ChatterBot questions): each reading's tuned configuration, its
    frozen-U twin and best-of-N at N, with no tuning on these prompts."""

    seed: int = key(SEED)
    n_prompts: int = key(integer(1))
    N: int = key(integer(1))
    batch_size: int = key(integer(1))


@dataclass(frozen=True)
class Replicate(Section, section='replicate'):
    """The whole procedure again with other seeds: each seed's own tune search (the tune section's arms, rungs and
    prompts), then each reading's selection, its frozen-U twin, best-of-N and the tuned sampler on the test prompts."""

    seeds: list[int] = key(list_of(SEED))
    test_prompts: int = key(integer(1))
    N: int = key(integer(1))
    batch_size: int = key(integer(1))


@dataclass(frozen=True)
class Figures(Section, section='figures'):
    """The verdict's statistics: bootstrap resamples, interval level, the power the margins are set for, the N
    at which the claims are judged, the equivalence margin in reward sds."""

    n_boot: int = key(integer(100))
    ci_level: float = key(num(0.5, 1, high_open=True))
    seed: int = key(SEED)
    power: float = key(num(0, 1, low_open=True, high_open=True))
    verdict_N: int = key(integer(1))
    margin_sd: float = key(POS)


#: The checks of every key of every section, derived from the section classes.
SCHEMA: dict[str, dict[str, Check]] = {name: cls.checks() for name, cls in SECTIONS.items()}

#: The smoke configuration of the sections that several stages read besides their own: the one place
#: it is written. No notebook's parameters cell sets them; a stage run (papermill) injects
#: params.yaml's sections, and where nothing is injected (nbval, JupyterLab) :func:`check_notebook`
#: takes these: SmolLM2 on the CPU, 8 new tokens, the embedded reward.
SMOKE_SHARED: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "model": MappingProxyType({"name": "embedded", "dtype": "bfloat16", "device": "cpu", "cache_dir": "models",
                               "threads": 1, "max_rows": 256, "device_map": None}),
    "generation": MappingProxyType({"max_new_tokens": 8, "decode": "sample", "temperature": 1.0, "top_k": 0,
                                    "top_p": 1.0}),
    "reward": MappingProxyType({"kind": "embedded", "name": None, "dtype": "float32"}),
})

#: The file that declares the pipeline, in the project's root. Each notebook stage's sections, the files it
#: reads and its outputs are written there once, and :func:`stages` reads them from it.
PIPELINE_FILE = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    """A notebook stage as ``dvc.yaml`` declares it (``cmd: python -m prelogit.stage NAME``).

    ``sections``: the params.yaml sections the notebook receives, its own first: the stage's DVC
    ``params`` without ``launch``, which only the stage wrapper reads. ``paths``: the notebook
    parameter naming each earlier stage's file or results folder it reads, from the stage's
    ``meta.paths`` (DVC ignores ``meta``; :func:`stages` checks each file is a dep and each folder
    holds one). ``results_dir``: the one folder holding every output. ``sharded``: whether it reads
    ``launch``, i.e. can share its prompts out across processes (:mod:`prelogit.shard`).
    """

    name: str
    sections: tuple[str, ...]
    paths: Mapping[str, str]  # read-only: the stages are cached (:func:`stages`) and shared by every caller
    results_dir: str
    sharded: bool


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``dvc.yaml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PIPELINE_FILE).exists():
            return folder
    raise ParameterError(f"no {PIPELINE_FILE} in {here} or above: run from inside the prelogit repository, "
                         "whose dvc.yaml declares each stage's sections and paths")


def stages(root: str | Path | None = None) -> dict[str, Stage]:
    """The notebook stages of the project at ``root`` (default: :func:`project_root`), in dvc.yaml's order."""
    path = project_root(root) / PIPELINE_FILE
    return dict(_read_stages(str(path), path.stat().st_mtime_ns))  # a copy: the cached mapping stays as read


@functools.lru_cache(maxsize=8)
def _read_stages(path: str, mtime_ns: int) -> dict[str, Stage]:
    """Parse and check ``path``; ``mtime_ns`` is part of the cache key, so an edited dvc.yaml is read again."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ParameterError(f"{path} is not valid YAML: {err}") from err
    declared = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(declared, dict):
        raise ParameterError(f"{path} must hold a mapping of stages under 'stages:'")
    out: dict[str, Stage] = {}
    for name, spec in declared.items():
        if not str(spec.get("cmd", "")).startswith("python -m prelogit.stage "):
            continue  # a script stage (the frozen benchmarks): no sections, nothing injected
        out[name] = _stage(path, name, spec)
    return out


def _entries(spec: dict, field_name: str) -> list[str]:
    """The paths a dvc.yaml stage lists under ``field_name`` (plain strings or one-key mappings)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in spec.get(field_name) or []]


def _stage(path: str, name: str, spec: dict) -> Stage:
    where = f"{path}: stage {name}"
    if spec["cmd"] != f"python -m prelogit.stage {name}":
        raise ParameterError(f"{where} runs {spec['cmd']!r}; its cmd must be 'python -m prelogit.stage {name}'")
    listed = _entries(spec, "params")
    sections = tuple(s for s in listed if s != "launch")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections or sections[0] != name:
        raise ParameterError(f"{where} lists params {listed}: list the stage's own section ({name}) first, then the "
                             f"params.yaml sections its notebook reads, out of {', '.join(SECTIONS)}")
    deps = _entries(spec, "deps")
    paths = dict((spec.get("meta") or {}).get("paths") or {})
    for parameter, target in paths.items():
        is_file = bool(Path(target).suffix)
        if (target not in deps) if is_file else not any(d.startswith(f"{target}/") for d in deps):
            raise ParameterError(f"{where}: meta.paths.{parameter} = {target} is not among its deps; add "
                                 f"{'it' if is_file else 'the files it reads from that folder'} to the stage's deps")
    folders = {str(Path(p).parent) for f in ("outs", "metrics", "plots") for p in _entries(spec, f)}
    if len(folders) != 1:
        raise ParameterError(f"{where} writes into {sorted(folders) or 'no folder'}: its outputs must share one "
                             "results folder")
    return Stage(name, sections, MappingProxyType(paths), folders.pop(), "launch" in listed)


def load(path: str | Path = "params.yaml") -> dict:
    """Read ``params.yaml``; a missing or malformed file gets a message saying what to fix."""
    path = Path(path)
    if not path.exists():
        raise ParameterError(f"{path} does not exist; run from the repository root or pass --params")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParameterError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParameterError(f"{path} must be a mapping of sections (model, generation, ...), got {type(data).__name__}")
    return data


def validate_section(params: dict, section: str) -> dict:
    """Check one section against :data:`SCHEMA`; return it. Errors name ``section.key``."""
    if section not in params or not isinstance(params[section], dict):
        raise ParameterError(f"params.yaml has no section {section!r}; add it (see the README's parameter table)")
    values, schema = params[section], SCHEMA[section]
    for key, check in schema.items():
        if key not in values:
            raise ParameterError(f"params.yaml: missing key {section}.{key}")
        check(f"{section}.{key}", values[key])
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ParameterError(f"params.yaml: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                             "remove them or add them to prelogit.params.SCHEMA and the notebook")
    _cross_checks(section, values)
    return values


def _cross_checks(section: str, v: dict) -> None:
    if section == "bon":
        if v["large_prompts"] > v["n_prompts"]:
            raise ParameterError(f"bon.large_prompts = {v['large_prompts']} exceeds bon.n_prompts = {v['n_prompts']}; "
                                 "the large runs use the first bon.n_prompts test prompts")
        if v["large_samples"] < v["max_samples"]:
            raise ParameterError(f"bon.large_samples = {v['large_samples']} is below bon.max_samples = "
                                 f"{v['max_samples']}; raise it (or set bon.large_prompts: 0)")
        top = v["large_samples"] if v["large_prompts"] else v["max_samples"]
        too_big = [b for b in v["budgets"] if b > top]
        if too_big:
            raise ParameterError(f"bon.budgets {too_big} exceed the most samples drawn ({top})")
    if section == "aisp":
        for key in ("large_prompts", "lit_prompts", "variance_prompts"):
            if v[key] > v["n_prompts"]:
                raise ParameterError(f"aisp.{key} = {v[key]} exceeds aisp.n_prompts = {v['n_prompts']}; "
                                     f"it counts from the first aisp.n_prompts test prompts, so lower aisp.{key}")
        if v["large_N"] < v["N"] or v["large_N"] % v["N"]:
            raise ParameterError(f"aisp.large_N = {v['large_N']} must be a multiple of aisp.N = {v['N']}, "
                                 "so that the large runs extend the same iterations")
        if v["N"] % v["lit_n"]:
            raise ParameterError(f"aisp.N = {v['N']} is not a multiple of aisp.lit_n = {v['lit_n']}; "
                                 "the budget is lit_n x K")
    if section == "tune":
        rungs = v["rungs"]
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[-1] > v["n_prompts"]:
            raise ParameterError(f"tune.rungs = {rungs} must increase strictly and end at most at tune.n_prompts = "
                                 f"{v['n_prompts']} (they are cumulative prompt counts)")
        if v["claim_prompts"] > v["n_prompts"]:
            raise ParameterError(f"tune.claim_prompts = {v['claim_prompts']} exceeds tune.n_prompts = {v['n_prompts']}")
        if len(set(v["readings"])) != len(v["readings"]):
            raise ParameterError(f"tune.readings = {v['readings']} repeats a reading; list each of sample, greedy once")
        for key, n in [("tune.center.n", v["center"]["n"])] + [(f"tune.n[{i}]", x) for i, x in enumerate(v["n"])]:
            if v["N"] % n:
                raise ParameterError(f"{key} = {n} does not divide tune.N = {v['N']}; the budget is n x K")
    if section == "samplers":
        rungs = v["rungs"]
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[-1] > v["n_prompts"]:
            raise ParameterError(f"samplers.rungs = {rungs} must increase strictly and end at most at samplers.n_prompts "
                                 f"= {v['n_prompts']} (they are cumulative prompt counts); fix samplers.rungs or raise "
                                 "samplers.n_prompts")
        if not (v["temperature"] and v["top_p"]) and not v["sigma_rms"]:
            raise ParameterError("samplers has no arm: give samplers.temperature and samplers.top_p (both non-empty) "
                                 "or samplers.sigma_rms")
        if bool(v["temperature"]) != bool(v["top_p"]):
            raise ParameterError(f"samplers.temperature = {v['temperature']} and samplers.top_p = {v['top_p']}: the "
                                 "temperature arms are their cross product, so give both or neither")
    if section == "misvo":
        rungs = v["rungs"]
        if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[-1] > v["val_prompts"]:
            raise ParameterError(f"misvo.rungs = {rungs} must increase strictly and end at most at misvo.val_prompts = "
                                 f"{v['val_prompts']} (they are cumulative prompt counts)")
        for key, K in [("misvo.center.K", v["center"]["K"])] + [(f"misvo.K[{i}]", x) for i, x in enumerate(v["K"])]:
            if v["N"] % K:
                raise ParameterError(f"{key} = {K} does not divide misvo.N = {v['N']}; the budget is K x steps")
    if section == "launch" and v["launcher"] == "python" and v["num_processes"] != 1:
        raise ParameterError(f"launch.num_processes = {v['num_processes']} needs launch.launcher: accelerate "
                             "(a plain python process runs every prompt itself); set launcher: accelerate or num_processes: 1")
    if section == "launch" and v["config_file"] is not None and v["launcher"] != "accelerate":
        raise ParameterError("launch.config_file is read by accelerate launch only; set launch.launcher: accelerate "
                             "or config_file: null")
    if section == "prepare" and v["source"] != "chitchat" and not v["source_path"]:
        raise ParameterError(f"prepare.source_path must name the {v['source']} data file or hub id")
    if section == "reward" and v["kind"] == "hf" and not v["name"]:
        raise ParameterError("reward.name must name a sequence-classification reward model when reward.kind is hf")


def stage_parameters(stage: str, params: dict, root: str | Path | None = None) -> dict:
    """The parameters papermill injects into ``notebooks/STAGE.ipynb``: each of the stage's sections
    (:class:`Stage`, from the dvc.yaml of the project at ``root``) as a mapping named after it, its
    paths and its results folder."""
    known = stages(root)
    if stage not in known:
        raise ParameterError(f"unknown stage {stage!r}; one of {', '.join(known)}")
    spec = known[stage]
    out: dict[str, Any] = {section: dict(validate_section(params, section)) for section in spec.sections}
    check_across_sections(stage, params)
    out.update(spec.paths)
    out["results_dir"] = spec.results_dir
    return out


#: Prompt counts each stage reads from the prepared prompts file: (section.key, split, or the key naming it).
PROMPT_COUNTS: dict[str, list[tuple[str, str]]] = {
    "bon": [("bon.n_prompts", "test")],
    "tune": [("tune.n_prompts+tune.holdout_prompts", "val")],
    "samplers": [("samplers.n_prompts", "val"), ("samplers.test_prompts", "test")],
    "aisp": [("aisp.n_prompts", "test")],
    "misvo": [("misvo.val_prompts", "val"), ("misvo.n_prompts", "test")],
    "args": [("args.n_prompts", "test")],
    "recontrol": [("recontrol.n_prompts", "test"), ("recontrol.train_prompts", "train")],
    "theory": [("theory.gauss_prompts", "theory.gauss_split")],
    "transfer": [("transfer.n_prompts", "qa")],
    "replicate": [("tune.n_prompts+tune.holdout_prompts", "val"), ("replicate.test_prompts", "test")],
}


def prompt_counts(stage: str, params: dict) -> list[tuple[str, int, str]]:
    """``(key, number asked for, split)`` for every prompt count ``stage`` reads."""
    def value(key: str) -> Any:  # a key, or keys joined by "+" for prompts read one after the other
        parts = [params[section][name] for section, name in (k.split(".") for k in key.split("+"))]
        return parts[0] if len(parts) == 1 else sum(parts)

    return [(key, value(key), value(split) if "." in split else split) for key, split in PROMPT_COUNTS.get(stage, [])]


def check_across_sections(stage: str, params: dict) -> None:
    """Checks between keys of different sections, once each section on its own is valid.

    For ``prepare`` this compares n_train/n_val/n_test with the prompt counts the later stages
    will ask for, where those sections are present and valid (their own stage reports them
    otherwise), so that a too-small prepare run is caught before it runs.
    """
    if stage in ("aisp", "tune", "replicate"):
        limit = params["generation"]["max_new_tokens"]
        if stage == "aisp":
            taus = [("aisp.lit_tau", params["aisp"]["lit_tau"])]
        else:
            taus = [("tune.center.tau", params["tune"]["center"]["tau"])]
            taus += [(f"tune.tau[{i}]", t) for i, t in enumerate(params["tune"]["tau"])]
        for key, tau in taus:
            if tau == "full":
                continue
            if tau > limit:
                raise ParameterError(f"{key} = {tau} exceeds generation.max_new_tokens = {limit}: AISP controls "
                                     f"only generated tokens; lower {key} to at most {limit} "
                                     "(tau = max_new_tokens controls every generated token)")
    if stage == "replicate":
        seeds, main_seed = params["replicate"]["seeds"], params["tune"]["seed"]
        if len(set(seeds)) != len(seeds) or main_seed in seeds:
            raise ParameterError(f"replicate.seeds = {seeds} must be distinct and must not repeat tune.seed = {main_seed} "
                                 "(the main pipeline's run, which the figures pool with them); choose other seeds")
    if stage == "samplers":
        limit, tau = params["generation"]["max_new_tokens"], params["samplers"]["tau"]
        if params["samplers"]["sigma_rms"] and tau > limit:
            raise ParameterError(f"samplers.tau = {tau} exceeds generation.max_new_tokens = {limit}: the noisy-greedy "
                                 f"arms perturb only generated tokens; lower samplers.tau to at most {limit}")
    if stage == "misvo":
        gen, tune = params["generation"], params.get("tune")
        if gen["top_k"] != 0 or gen["top_p"] < 1:
            raise ParameterError(f"MISVO's score function needs untruncated sampling: generation.top_k = {gen['top_k']} "
                                 f"and generation.top_p = {gen['top_p']}; set top_k: 0 and top_p: 1.0")
        # The search scores MISVO against the tune stage's best-of-N draws on the same validation prompts
        # (checked here when params.yaml is at hand; the notebook checks the draws themselves).
        if isinstance(tune, dict):
            validate_section(params, "tune")
            if params["misvo"]["val_prompts"] > tune["n_prompts"] or params["misvo"]["N"] > tune["N"]:
                raise ParameterError(f"misvo.val_prompts = {params['misvo']['val_prompts']} and misvo.N = "
                                     f"{params['misvo']['N']} must not exceed tune.n_prompts = {tune['n_prompts']} and "
                                     f"tune.N = {tune['N']}: the search is scored against the tune stage's best-of-N "
                                     "draws (results/tune/bon.jsonl)")
    if stage == "prepare":
        made = {split: params["prepare"][f"n_{split}"] for split in ("train", "val", "test", "qa")}
        for later in PROMPT_COUNTS:
            try:
                validate_section(params, later)
                counts = prompt_counts(later, params)
            except ParameterError:
                continue
            for key, want, split in counts:
                if want > made[split]:
                    raise ParameterError(f"prepare.n_{split} = {made[split]} but the {later} stage asks for "
                                         f"{key} = {want} {split} prompts; raise prepare.n_{split} or lower {key}")


def enter_project_root() -> Path:
    """chdir to the folder holding ``dvc.yaml`` (:func:`project_root`) and return it.

    Notebooks use paths relative to the repository root; JupyterLab and nbval start the kernel in
    ``notebooks/``, papermill (``--cwd .``) in the root. This makes all three agree.
    """
    root = project_root()
    os.chdir(root)
    return root


#: Where a notebook writes when nothing was injected into it (nbval, JupyterLab): ``SMOKE_RESULTS/<stage>``,
#: never a stage's own results folder. Git ignores it.
SMOKE_RESULTS = "results/_smoke"


def open_notebook(stage: str, namespace: Mapping[str, Any]) -> SimpleNamespace:
    """What a stage's notebook runs with, after entering the project root: ``P = open_notebook("aisp", globals())``.

    ``P`` holds the stage's sections, checked and typed (:func:`check_notebook`: ``P.aisp``,
    ``P.model``, ...); the files it reads, under the names of its dvc.yaml ``meta.paths``
    (``P.prompts_path``, ``P.tuned_path``, ..., as :class:`~pathlib.Path` relative to the root); and
    ``P.out``, its results folder.

    A notebook's parameters cell sets only its own section. A stage run (``python -m
    prelogit.stage``) injects params.yaml's sections, the paths and a staging results folder after
    it (:func:`stage_parameters`); a notebook run that nothing injected into (nbval, JupyterLab)
    takes the shared sections' smoke values (:data:`SMOKE_SHARED`), dvc.yaml's paths and
    ``SMOKE_RESULTS/<stage>``.
    """
    enter_project_root()
    spec = stages()[stage]
    P = check_notebook(stage, namespace)
    for name, default in spec.paths.items():
        setattr(P, name, Path(namespace.get(name) or default))
    P.out = Path(namespace.get("results_dir") or f"{SMOKE_RESULTS}/{stage}")
    return P


def check_notebook(stage: str, namespace: Mapping[str, Any]) -> SimpleNamespace:
    """Validate a notebook's parameters (run as a cell right after the ``parameters`` cell) and return
    the stage's sections, typed, by name: ``p = check_notebook("aisp", globals())``, then ``p.aisp.N``
    (a :class:`AISP`), ``p.model.dtype`` (a :class:`Model`), and so on for every section it reads.

    Papermill injects values after the ``parameters`` cell, so this sees what the run will use,
    smoke configuration included, and stops it with a message naming the parameter. A shared section
    that nothing injected (nbval, JupyterLab) takes its smoke values, :data:`SMOKE_SHARED`.
    """
    given: dict[str, Any] = {}
    for section in stages()[stage].sections:
        if section in namespace:
            given[section] = namespace[section]
        elif section in SMOKE_SHARED:
            given[section] = dict(SMOKE_SHARED[section])
        else:
            raise ParameterError(f"notebook parameter {section} (the params.yaml section {section}) is not set: "
                                 f"the parameters cell of notebooks/{stage}.ipynb declares it")
    typed = {section: SECTIONS[section].of(given) for section in given}
    check_across_sections(stage, given)
    return SimpleNamespace(**typed)

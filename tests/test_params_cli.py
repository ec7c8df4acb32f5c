"""``python -m prelogit.preflight STAGE`` on broken copies of params.yaml: exit 2, a message naming the
key, no traceback, and results/STAGE left exactly as it was. One passing case per stage.

Each case runs the command itself in a temporary folder holding a copy of the repository's
params.yaml (counts lowered to fit a small synthetic prompts file), the repository's dvc.yaml (which
declares each stage's sections and paths) and a previous results/STAGE/params.yaml.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prelogit import params

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": 3, "val": 2, "test": 4, "qa": 3}
PREVIOUS = "previous: true\n"
NO_FILE = object()  # a mutation returning this leaves params.yaml unwritten


def baseline() -> dict:
    """The repository's params.yaml with every prompt count fitted to :data:`SPLITS`."""
    p = params.load(ROOT / "params.yaml")
    p["prepare"].update(n_train=SPLITS["train"], n_val=SPLITS["val"], n_test=SPLITS["test"], n_qa=SPLITS["qa"])
    p["transfer"]["n_prompts"] = SPLITS["qa"]
    p["replicate"]["test_prompts"] = SPLITS["test"]
    for stage in ("bon", "aisp", "args", "recontrol", "misvo"):
        p[stage]["n_prompts"] = SPLITS["test"]
    p["misvo"].update(val_prompts=SPLITS["val"], rungs=[1, 2])
    p["bon"]["large_prompts"] = p["aisp"]["large_prompts"] = p["aisp"]["lit_prompts"] = 2
    p["aisp"]["variance_prompts"] = 2
    p["tune"].update(n_prompts=SPLITS["val"], holdout_prompts=0, rungs=[1, 2], claim_prompts=SPLITS["val"])
    p["samplers"].update(n_prompts=SPLITS["val"], rungs=[1, 2], test_prompts=SPLITS["test"])
    p["recontrol"]["train_prompts"] = SPLITS["train"]
    p["theory"].update(gauss_split="train", gauss_prompts=SPLITS["train"])
    return p


def put(key, value):
    section, name = key.split(".")
    return lambda p, d: p[section].__setitem__(name, value)


def drop(key):
    section, _, name = key.partition(".")
    return lambda p, d: p[section].pop(name) if name else p.pop(section)


def both(*mutations):
    def mutate(p, d):
        for m in mutations:
            m(p, d)
    return mutate


def text(raw):
    return lambda p, d: raw


def folder(key, with_config=False):
    """Point ``key`` at a new folder under the test's folder (with or without a config.json)."""
    def mutate(p, d):
        path = d / "some_model"
        path.mkdir()
        if with_config:
            (path / "config.json").write_text("{}")
        put(key, str(path))(p, d)
    return mutate


def no_prompts_file(p, d):
    (d / "results" / "prepare" / "prompts.jsonl").unlink()


HF = put("reward.kind", "hf")
ACCELERATE = both(put("launch.launcher", "accelerate"), put("launch.num_processes", 2))
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")

CASES = [
    # the file itself
    ("aisp", lambda p, d: NO_FILE, "params.yaml does not exist"),
    ("aisp", text("aisp: [sigma: 1\n"), "not valid YAML"),
    ("bon", text("- model\n- bon\n"), "must be a mapping of sections"),
    ("bon", text(""), "must be a mapping of sections"),
    # sections and keys
    ("aisp", drop("model"), "no section 'model'"),
    ("bon", drop("generation"), "no section 'generation'"),
    ("aisp", drop("aisp.lit_sigma"), "missing key aisp.lit_sigma"),
    ("aisp", put("aisp.sigmaa", 1), "unknown key(s) aisp.sigmaa"),
    # types
    ("aisp", put("aisp.lit_n", "eight"), "aisp.lit_n must be an integer, got 'eight'"),
    ("bon", put("bon.max_samples", 32.0), "bon.max_samples must be an integer, got 32.0"),
    ("args", put("args.k", True), "args.k must be an integer, got True"),
    ("aisp", put("aisp.lit_sigma", [0.5]), "aisp.lit_sigma must be a number, got [0.5]"),
    ("aisp", put("aisp.final_rollout", "yes"), "aisp.final_rollout must be true or false"),
    ("prepare", put("model.name", ""), "model.name must be a non-empty string"),
    # ranges
    ("aisp", put("aisp.lit_sigma", -0.1), "aisp.lit_sigma must be > 0, got -0.1"),
    ("aisp", put("aisp.lit_lams", [0.1, 0]), "aisp.lit_lams[1] must be > 0, got 0"),
    ("aisp", put("aisp.lit_alpha", 1.5), "aisp.lit_alpha must be >= 0 and <= 1, got 1.5"),
    ("aisp", put("aisp.lit_tau", -3), "aisp.lit_tau must be >= 0, got -3"),
    ("tune", put("tune.sigma_rms", [0.25, 0]), "tune.sigma_rms[1] must be > 0, got 0"),
    ("tune", put("tune.eta", 1), "tune.eta must be >= 2, got 1"),
    ("bon", put("generation.top_p", 0), "generation.top_p must be > 0 and <= 1, got 0"),
    ("args", put("generation.temperature", 0), "generation.temperature must be > 0, got 0"),
    ("theory", put("model.threads", -1), "model.threads must be >= 0, got -1"),
    ("recontrol", put("recontrol.holdout", 1.0), "recontrol.holdout must be >= 0 and < 1, got 1.0"),
    # the replicate stage: other seeds than the main run's, each once; its own prompt counts
    ("replicate", put("replicate.seeds", [2, 1]), "must not repeat tune.seed = 1"),
    ("replicate", put("replicate.seeds", [3, 3]), "replicate.seeds = [3, 3] must be distinct"),
    ("replicate", put("replicate.seeds", []), "replicate.seeds"),
    ("replicate", put("replicate.test_prompts", SPLITS["test"] + 1), "replicate.test_prompts = 5 but"),
    ("prepare", put("replicate.test_prompts", SPLITS["test"] + 1), "the replicate stage asks for replicate.test_prompts = 5"),
    # choices
    ("bon", put("generation.decode", "beam"), "generation.decode must be one of 'sample', 'greedy', got 'beam'"),
    ("tune", lambda p, d: p["tune"]["center"].__setitem__("alpha_mode", "both"),
     "tune.center.alpha_mode must be one of 'mppi', 'step', got 'both'"),
    ("tune", lambda p, d: p["tune"]["center"].pop("n"), "tune.center: missing key(s) n"),
    ("tune", put("tune.tau", [8, "half"]), "tune.tau[1] must be an integer, got 'half'"),
    ("prepare", put("model.dtype", "float8"), "model.dtype must be one of"),
    ("theory", put("theory.gauss_split", "dev"), "theory.gauss_split must be one of"),
    # lists and keys that depend on each other within a section
    ("bon", put("bon.budgets", [1, 512]), "bon.budgets [512] exceed the most samples drawn (256)"),
    ("bon", put("bon.large_samples", 16), "bon.large_samples = 16 is below bon.max_samples = 64"),
    ("bon", put("bon.large_prompts", 5), "bon.large_prompts = 5 exceeds bon.n_prompts = 4"),
    ("aisp", put("aisp.large_N", 100), "aisp.large_N = 100 must be a multiple of aisp.N = 64"),
    ("aisp", put("aisp.lit_n", 48), "aisp.N = 64 is not a multiple of aisp.lit_n = 48"),
    ("tune", put("tune.rungs", [2, 2]), "tune.rungs = [2, 2] must increase strictly"),
    ("tune", put("tune.claim_prompts", 3), "tune.claim_prompts = 3 exceeds tune.n_prompts = 2"),
    ("tune", put("tune.n", [8, 24]), "tune.n[1] = 24 does not divide tune.N = 64"),
    ("bon", put("bon.budgets", []), "bon.budgets must be a list of at least 1 item(s)"),
    ("misvo", put("misvo.rungs", [2, 1]), "misvo.rungs = [2, 1] must increase strictly and end at most at "
                                          "misvo.val_prompts = 2"),
    ("misvo", put("misvo.K", [4, 24]), "misvo.K[1] = 24 does not divide misvo.N = 64; the budget is K x steps"),
    ("misvo", lambda p, d: p["misvo"]["center"].__setitem__("fisher", "diagonal"),
     "misvo.center.fisher must be one of 'reference', 'identity', got 'diagonal'"),
    ("misvo", lambda p, d: p["misvo"]["center"].pop("eta"), "misvo.center: missing key(s) eta"),
    ("misvo", put("misvo.eta", [0.1, 0]), "misvo.eta[1] must be > 0, got 0"),
    ("misvo", put("misvo.K", [1]), "misvo.K[0] must be >= 2, got 1"),
    ("misvo", put("misvo.halving", 1), "misvo.halving must be >= 2, got 1"),
    ("misvo", put("generation.top_k", 50), "MISVO's score function needs untruncated sampling: generation.top_k = 50"),
    ("misvo", put("misvo.N", 128), "must not exceed tune.n_prompts = 2 and tune.N = 64: the search is scored against "
                                   "the tune stage's best-of-N draws"),
    ("misvo", put("misvo.n_prompts", 5), "misvo.n_prompts = 5 but results/prepare/prompts.jsonl has 4 test prompts"),
    ("prepare", put("misvo.val_prompts", 3), "prepare.n_val = 2 but the misvo stage asks for misvo.val_prompts = 3"),
    ("prepare", put("prepare.source", "hh_rlhf"), "prepare.source_path must name the hh_rlhf data file"),
    ("bon", HF, "reward.name must name a sequence-classification reward model"),
    ("samplers", put("samplers.rungs", [2, 3]), "samplers.rungs = [2, 3] must increase strictly and end at most at "
                                                "samplers.n_prompts = 2"),
    ("samplers", put("samplers.top_p", [0.9, 0]), "samplers.top_p[1] must be > 0 and <= 1, got 0"),
    ("samplers", put("samplers.top_p", []), "give both or neither"),
    ("samplers", both(put("samplers.temperature", []), put("samplers.top_p", []), put("samplers.sigma_rms", [])),
     "samplers has no arm"),
    ("samplers", put("samplers.tau", 30), "samplers.tau = 30 exceeds generation.max_new_tokens = 16"),
    ("samplers", put("samplers.test_prompts", 5), "samplers.test_prompts = 5 but results/prepare/prompts.jsonl has 4 "
                                                  "test prompts"),
    ("aisp", put("aisp.lit_prompts", 5), "aisp.lit_prompts = 5 exceeds aisp.n_prompts = 4"),
    # between sections
    ("aisp", put("aisp.lit_tau", 30), "aisp.lit_tau = 30 exceeds generation.max_new_tokens = 16: AISP controls "
                                      "only generated tokens; lower aisp.lit_tau to at most 16 (tau = max_new_tokens "
                                      "controls every generated token)"),
    ("tune", put("tune.tau", [8, 128]), "tune.tau[1] = 128 exceeds generation.max_new_tokens = 16"),
    ("prepare", put("tune.n_prompts", 3), "prepare.n_val = 2 but the tune stage asks for "
                                          "tune.n_prompts+tune.holdout_prompts = 3"),
    ("prepare", put("tune.holdout_prompts", 1), "prepare.n_val = 2 but the tune stage asks for "
                                                "tune.n_prompts+tune.holdout_prompts = 3 val prompts"),
    ("tune", put("tune.readings", ["greedy", "greedy"]), "tune.readings = ['greedy', 'greedy'] repeats a reading"),
    ("tune", put("tune.readings", ["beam"]), "tune.readings[0] must be one of 'sample', 'greedy', got 'beam'"),
    ("tune", both(put("tune.n_prompts", 3), put("tune.rungs", [1, 3])),
     "tune.n_prompts+tune.holdout_prompts = 3 but results/prepare/prompts.jsonl has 2 val prompts"),
    ("prepare", put("aisp.n_prompts", 100000), "prepare.n_test = 4 but the aisp stage asks for aisp.n_prompts = "
                                               "100000 test prompts; raise prepare.n_test or lower aisp.n_prompts"),
    ("prepare", put("recontrol.train_prompts", 20), "prepare.n_train = 3 but the recontrol stage asks for "
                                                    "recontrol.train_prompts = 20"),
    # the prepared prompts file
    ("aisp", put("aisp.n_prompts", 100000), "aisp.n_prompts = 100000 but results/prepare/prompts.jsonl has 4 test "
                                            "prompts; lower aisp.n_prompts or raise prepare.n_test and re-run prepare"),
    ("bon", put("bon.n_prompts", 5), "bon.n_prompts = 5 but results/prepare/prompts.jsonl has 4 test prompts"),
    ("args", put("args.n_prompts", 5), "args.n_prompts = 5 but results/prepare/prompts.jsonl has 4 test prompts"),
    ("recontrol", put("recontrol.n_prompts", 5), "recontrol.n_prompts = 5 but results/prepare/prompts.jsonl has 4"),
    ("recontrol", put("recontrol.train_prompts", 4), "recontrol.train_prompts = 4 but results/prepare/prompts.jsonl "
                                                     "has 3 train prompts; lower recontrol.train_prompts or raise "
                                                     "prepare.n_train and re-run prepare"),
    ("theory", both(put("theory.gauss_split", "val"), put("theory.gauss_prompts", 3)),
     "theory.gauss_prompts = 3 but results/prepare/prompts.jsonl has 2 val prompts"),
    ("bon", no_prompts_file, "results/prepare/prompts.jsonl does not exist; run the prepare stage first "
                             "(dvc repro prepare)"),
    ("args", lambda p, d: (d / "results" / "prepare" / "prompts.jsonl").write_text('{"split": "test"}\nnot json\n'),
     "results/prepare/prompts.jsonl line 2 is not valid JSON"),
    # this machine: device, model and reward folders, the hub cache
    pytest.param("bon", put("model.device", "cuda"), "model.device = 'cuda' but no CUDA GPU is visible", marks=NO_GPU),
    ("aisp", put("model.device", "cuda:99"), "model.device = 'cuda:99' but "),
    ("prepare", put("model.device", "gpu"), "model.device must be a torch device: cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("args", put("model.name", "./no_such_model"), "model.name: folder './no_such_model' does not exist"),
    ("prepare", folder("model.name"), "has no config.json; point model.name at a folder written by save_pretrained"),
    ("theory", put("model.name", "no-such-org/no-such-model"), "model.name = 'no-such-org/no-such-model' is a hub id, "
                                                               "but offline mode is on"),
    ("bon", both(HF, put("reward.name", "./no_such_rm")), "reward.name: folder './no_such_rm' does not exist"),
    ("recontrol", both(HF, folder("reward.name")), "has no config.json; point reward.name at"),
    ("aisp", both(HF, put("reward.name", "no-such-org/no-such-rm")), "reward.name = 'no-such-org/no-such-rm' is a "
                                                                     "hub id, but offline mode is on"),
    # how a generating stage is launched (prelogit.launch)
    ("bon", drop("launch"), "params.yaml has no section 'launch'"),
    ("tune", put("launch.launcher", "torchrun"), "launch.launcher must be one of 'python', 'accelerate', got 'torchrun'"),
    ("aisp", put("launch.num_processes", 2), "launch.num_processes = 2 needs launch.launcher: accelerate"),
    ("args", put("launch.num_processes", 0), "launch.num_processes must be >= 1, got 0"),
    ("recontrol", put("launch.config_file", "accel.yaml"), "launch.config_file is read by accelerate launch only"),
    ("misvo", both(ACCELERATE, put("launch.config_file", "./no_such_accelerate.yaml")),
     "launch.config_file no_such_accelerate.yaml does not exist: write it with `accelerate config --config_file "
     "no_such_accelerate.yaml`, or set launch.config_file: null"),
    ("bon", both(ACCELERATE, lambda p, d: (d / "accel.yaml").write_text("- not\n- a mapping\n"),
                 put("launch.config_file", "accel.yaml")), "accel.yaml is not a YAML mapping of accelerate options"),
    ("aisp", both(ACCELERATE, put("model.device_map", "auto")), "model.device_map: auto spreads one model over every "
                                                               "visible GPU, so 2 processes would each load it"),
    ("bon", put("model.device_map", "balanced"), "model.device_map must be one of 'auto', got 'balanced'"),
    pytest.param("bon", both(ACCELERATE, put("model.device", "cuda")), "model.device = 'cuda' but no CUDA GPU is "
                 "visible", marks=NO_GPU),
    # valid: one per stage (an hf reward folder with a config.json passes the params step)
    *[(stage, None, None) for stage in params.stages(ROOT)],
    ("bon", both(HF, folder("reward.name", with_config=True)), None),
    ("tune", ACCELERATE, None),  # two CPU processes need no accelerate configuration
    ("theory", put("launch.num_processes", 2), None),  # theory is never sharded: it does not read launch
]


def _id(case):
    stage, _, expected = case.values if hasattr(case, "values") else case
    return f"{stage}-{expected or 'valid'}"[:70]


@pytest.mark.parametrize("stage, mutate, expected", CASES, ids=[_id(c) for c in CASES])
def test_params_cli(tmp_path, stage, mutate, expected):
    prepared = tmp_path / "results" / "prepare" / "prompts.jsonl"
    prepared.parent.mkdir(parents=True)
    prepared.write_text("".join(json.dumps({"id": f"{split}-{i}", "split": split, "text": "hi", "prompt": "hi"}) + "\n"
                                for split, n in SPLITS.items() for i in range(n)))
    out = tmp_path / "results" / stage / "params.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PREVIOUS)
    before = sorted(out.parent.iterdir())
    p = baseline()
    raw = mutate(p, tmp_path) if mutate else None
    if raw is not NO_FILE:
        (tmp_path / "params.yaml").write_text(raw if isinstance(raw, str) else yaml.safe_dump(p))
    shutil.copy(ROOT / "dvc.yaml", tmp_path)  # the stages' sections and paths
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "prelogit.preflight", stage, "--params", "params.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(out.parent.iterdir()) == before  # nothing added, no temporary file left behind
    if expected is None:
        assert proc.returncode == 0, proc.stderr
        assert yaml.safe_load(out.read_text()) == params.stage_parameters(stage, p, ROOT)
        return
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert out.read_bytes() == PREVIOUS.encode()

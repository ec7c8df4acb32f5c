"""Sharding prompts across processes (prelogit.shard): records identical to one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prelogit import shard

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "shard_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_cost(records):
    return [{k: v for k, v in r.items() if k != "cost"} for r in records]


def test_one_process_runs_everything_in_order():
    assert shard.world() == (0, 1) and shard.is_main()
    assert shard.run_sharded([3, 1, 2], lambda rs: [r * 10 for r in rs]) == [30, 10, 20]
    assert shard.process_device("cuda") == "cuda" and shard.process_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="one per row"):
        shard.run_sharded([1, 2], lambda rs: rs[:1])


@pytest.mark.pipeline
def test_two_cpu_processes_give_the_records_of_one(tmp_path, smollm_dir):
    """best-of-N, AISP and MISVO on three prompts, sharded 2 + 1 over two gloo processes by
    ``accelerate launch``, against one plain process: the same records (timing aside), bit for bit,
    because the tiny model is float64 (its rounding cannot flip a draw between batch shapes)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run = subprocess.run([sys.executable, str(WORKER), str(one), str(smollm_dir)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    # --multi_gpu selects accelerate's torch.distributed launcher; without a GPU each process runs on the CPU
    # and the processes talk through gloo (accelerate's --cpu alone starts one process unless MPI is set up)
    run = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                          str(WORKER), str(two), str(smollm_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"], b["rank"]) == (1, 2, 0)
    for method in ("bon", "aisp", "misvo"):
        assert len(a[method]) == len(b[method]) == 3
        assert _strip_cost(a[method]) == _strip_cost(b[method]), method
        # the same work was done for each prompt: token counts do not depend on the process
        assert [r["cost"]["new_tokens"] for r in a[method]] == [r["cost"]["new_tokens"] for r in b[method]]

"""Prompts shared out across processes, records gathered back: the engine for ``accelerate launch``.

Under ``accelerate launch --num_processes P`` (or ``torchrun``) every process runs the same code.
:func:`run_sharded` gives each process a contiguous share of the prompts
(``PartialState.split_between_processes``), runs the caller's batched function (for example
:func:`prelogit.aisp.run_aisp_many`) on that share only, and gathers every process's records back
into the original prompt order on every process (``accelerate.utils.gather_object``); the caller
writes its outputs once, from the main process (:func:`is_main`). Started as a plain ``python``
process, nothing is shared out and nothing is gathered: the function runs on all prompts, exactly
as without this module.

Why the records do not depend on the sharding: a prompt's noise and token draws come from its own
generator, seeded by (seed, prompt id) (:func:`prelogit.engine.prompt_generator`), and the batched
engine keeps a prompt's draws independent of its batch-mates (:mod:`prelogit.sampling`). Which
process runs a prompt therefore changes only the float rounding of differently shaped batches,
which cannot flip a draw in float64 and does so very rarely in float32 (``tests/test_shard.py``).

Devices: :func:`process_device` maps a configured ``cuda`` to this process's own GPU
(``cuda:LOCAL_RANK``), so that P processes on P GPUs each load the model on their own device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .checks import ParameterError

T = TypeVar("T")


def _state() -> Any:
    """accelerate's process state (created once per process; CPU-only when no GPU is visible)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def world() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) outside a launcher."""
    st = _state()
    return st.process_index, st.num_processes


def is_main() -> bool:
    """True in the process that writes the outputs (the only process outside a launcher)."""
    return _state().is_main_process


def process_device(device: str) -> str:
    """The device this process should load the model on: ``cuda`` becomes ``cuda:LOCAL_RANK``
    when several processes share a machine's GPUs; any other device is returned unchanged.

    Raises:
        ParameterError: more processes on this machine than visible GPUs.
    """
    if device != "cuda":  # no process state needed (and none created) for cpu, mps or a pinned cuda:N
        return device
    st = _state()
    if st.num_processes == 1:
        return device
    import torch

    n = torch.cuda.device_count()
    if st.local_process_index >= n:
        raise ParameterError(f"{st.num_processes} processes were launched but this machine has {n} visible CUDA "
                             f"GPU(s); launch at most {n} processes per machine (accelerate launch --num_processes)")
    return f"cuda:{st.local_process_index}"


def run_sharded(rows: Sequence[T], fn: Callable[[list[T]], Sequence[Any]]) -> list[Any]:
    """``fn`` on this process's share of ``rows``; every process's results, in the order of ``rows``.

    Args:
        rows: the work items (prompt rows), in their canonical order; every process must pass the
            same list.
        fn: maps a list of rows to one result per row, in the same order (a batched driver such
            as ``lambda rs: run_aisp_many(sampler, reward, [r["prompt"] for r in rs], ...)``). It
            must not itself communicate between processes. A process whose share is empty does
            not call it.
    Returns:
        One result per row, on every process. With one process this is ``list(fn(list(rows)))``.
    Raises:
        ValueError: ``fn`` returned a different number of results than rows it was given.
    """
    rows = list(rows)
    st = _state()
    if st.num_processes == 1:
        out = list(fn(rows))
        _check_count(out, rows)
        return out
    from accelerate.utils import gather_object

    with st.split_between_processes(rows) as mine:
        mine = list(mine)
        out = list(fn(mine)) if mine else []
    _check_count(out, mine)
    gathered = gather_object(out)
    if len(gathered) != len(rows):  # every process must have passed the same rows
        raise ValueError(f"gathered {len(gathered)} results for {len(rows)} rows: the processes were given different "
                         "row lists")
    return gathered


def _check_count(out: list, rows: list) -> None:
    if len(out) != len(rows):
        raise ValueError(f"fn returned {len(out)} results for {len(rows)} rows; it must return one per row")


__all__ = ["world", "is_main", "process_device", "run_sharded"]

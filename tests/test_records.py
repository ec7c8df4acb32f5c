"""The record types of prelogit.records against real records: the declared keys are the keys the code writes.

Tiny runs (the 2-layer random Llama of conftest.py, a few tokens, the vowel-share reward), so that the
types cannot drift from the drivers (aisp, engine, samplers, misvo) or from the stage helpers (runs)
that fill the optional keys.
"""

import dataclasses
import math
import re
import typing

import pytest

from prelogit import records, runs, samplers
from prelogit.aisp import AISPConfig, run_aisp
from prelogit.engine import prompt_generator, run_best_of_n
from prelogit.misvo import MISVOConfig, run_misvo
from prelogit.records import (AISPBest, AISPConfigDict, AISPFinalRollout, AISPIteration, AISPRecord, BestOfNBest,
                              BestOfNRecord, CostRecord, MISVOBest, MISVOConfigDict, MISVOFinalRollout, MISVOIteration,
                              MISVORecord)
from prelogit.sampling import PrelogitSampler
from prelogit.theory import kl_best_of_n
from toy_rewards import VowelShare

PROMPT = "Hello there, how are you?"
TYPED_DICTS = [records.CostRecord, records.AISPConfigDict, records.AISPBest, records.AISPIteration,
               records.AISPFinalRollout, records.AISPRecord, records.BestOfNBest, records.BestOfNRecord,
               records.MISVOConfigDict, records.MISVOBest, records.MISVOIteration, records.MISVOFinalRollout,
               records.MISVORecord]


@pytest.fixture()
def sampler(tiny_lm, tokenizer):
    return PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=4)


def assert_keys(record, td, filled=()):
    """``record`` has every required key of ``td``, the optional ones in ``filled`` and nothing else."""
    assert set(filled) <= td.__optional_keys__, f"{td.__name__}: {set(filled) - td.__optional_keys__} not optional"
    assert set(record) == td.__required_keys__ | set(filled), (
        f"{td.__name__}: the record has {sorted(set(record) - td.__required_keys__ - set(filled))} undeclared, "
        f"lacks {sorted((td.__required_keys__ | set(filled)) - set(record))}")


def test_every_typed_dict_documents_every_field():
    assert set(TYPED_DICTS) == {v for v in vars(records).values() if typing.is_typeddict(v)}
    for td in TYPED_DICTS:
        doc = td.__doc__ or ""
        missing = [k for k in td.__annotations__ if not re.search(rf"(?<![\w.]){re.escape(k)}\b", doc)]
        assert not missing, f"{td.__name__}'s docstring does not describe {missing}"


def test_aisp_record_has_the_declared_keys(sampler):
    cfg = AISPConfig(sigma=0.5, lam=0.1, n=2, K=2, tau=2, B=2)
    rec = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    assert_keys(rec, AISPRecord)
    assert_keys(rec["config"], AISPConfigDict)
    assert set(AISPConfigDict.__annotations__) == {f.name for f in dataclasses.fields(AISPConfig)}
    assert_keys(rec["best"], AISPBest)
    assert_keys(rec["cost"], CostRecord)
    assert_keys(rec["final_rollout"], AISPFinalRollout)
    assert len(rec["iterations"]) == cfg.K
    for it in rec["iterations"]:
        assert_keys(it, AISPIteration)
        assert_keys(it["best_so_far"], AISPBest)
        assert len(it["rewards"]) == len(it["weights"]) == cfg.B and len(it["responses"]) == cfg.B * cfg.n
        # kl_control: the control-space KL of the mean after the update, ||U||^2 / (2 sigma^2)
        for kl, u in zip(it["kl_control"], it["U_norm"]):
            assert math.isclose(kl, u**2 / (2 * cfg.sigma**2), rel_tol=1e-4)
    assert rec["kl_control_final"] == rec["iterations"][-1]["kl_control"]  # the same quantity of the same final U
    assert len(rec["final_rollout"]["kl_sequence"]) == cfg.B


def test_best_of_n_and_sampler_records_have_the_declared_keys(sampler):
    rec = run_best_of_n(sampler, VowelShare(), PROMPT, PROMPT, 3, prompt_generator(0, 0))
    assert_keys(rec, BestOfNRecord)
    assert_keys(rec["best"], BestOfNBest)
    assert_keys(rec["cost"], CostRecord)
    assert rec["method"] == "bon"
    arm = samplers.SamplerArm("noisy_greedy", sigma_rms=1.0, tau=2)
    (smp,) = samplers.run_arm_many(sampler, VowelShare(), [PROMPT], [PROMPT], arm, 2, [prompt_generator(0, 0)], rms=1.0)
    assert_keys(smp, BestOfNRecord, filled=["arm"])
    assert_keys(smp["best"], BestOfNBest)
    assert smp["method"] == "sampler"


def test_misvo_record_has_the_declared_keys(sampler):
    cfg = MISVOConfig(eta=1.0, lam=1.0, K=2, steps=2)
    rec = run_misvo(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    assert_keys(rec, MISVORecord)
    assert_keys(rec["config"], MISVOConfigDict)
    assert set(MISVOConfigDict.__annotations__) == {f.name for f in dataclasses.fields(MISVOConfig)}
    assert_keys(rec["best"], MISVOBest)
    assert_keys(rec["cost"], CostRecord)
    assert_keys(rec["final_rollout"], MISVOFinalRollout)
    assert len(rec["iterations"]) == cfg.steps
    for it in rec["iterations"]:
        assert_keys(it, MISVOIteration)
        assert_keys(it["best_so_far"], MISVOBest)
    assert rec["iterations"][0]["kl_sequence"] == [0.0] * cfg.K  # u = 0 at step 1


def test_stage_helpers_fill_the_optional_keys_and_the_curves_rows(sampler):
    rows = [{"id": "p0", "split": "test", "text": PROMPT, "prompt": PROMPT}]
    judges = {"vowels": VowelShare()}
    bon = runs.best_of_n_records(sampler, VowelShare(), judges, rows, 4, 0, 4)
    assert_keys(bon[0], BestOfNRecord, filled=["prompt_id", "prompt", "judges"])
    cfg = AISPConfig(n=2, K=2, tau=2, final_rollout=False)
    aisp = runs.aisp_records(sampler, VowelShare(), judges, rows, cfg, 0, None)
    assert_keys(aisp[0], AISPRecord, filled=["prompt_id", "prompt", "best_so_far_judges"])
    assert aisp[0]["final_rollout"] is None
    fixed = {"N", "prompt_id", "reward"}
    for row in runs.bon_curve(bon, [1, 2, 4]):
        assert set(row) == fixed | {"kl_bound"} | set(judges) and runs.curve_judges(row) == list(judges)
        assert row["kl_bound"] == kl_best_of_n(row["N"])  # best-of-N's bound
    curve = runs.aisp_curve(aisp)
    assert [row["N"] for row in curve] == [2, 4]
    for row, it in zip(curve, aisp[0]["iterations"]):
        assert set(row) == fixed | {"kl_control"} | set(judges) and runs.curve_judges(row) == list(judges)
        assert row["kl_control"] == sum(it["kl_control"]) / len(it["kl_control"])  # the control-space KL, mean over chains
    for row in curve + runs.bon_curve(bon, [4]):
        assert all(isinstance(v, (int, float, str)) for v in row.values())  # records.CurveRow

"""Result files: timing only in timing.json, a short metrics.json, the details in summary.json."""

import json

import pytest

from prelogit import io


def test_write_json_and_jsonl_drop_timing_keys_except_in_the_timing_file(tmp_path):
    record = {"reward": 1.5, "cost": {"new_tokens": 8, "time_generation_s": 0.3}, 3: {"seconds": 2.0, "n": 1}}
    io.write_json(tmp_path / "a.json", record)
    io.write_jsonl(tmp_path / "a.jsonl", [record, record])
    io.write_json(tmp_path / io.TIMING_FILE, {"seconds": 2.0})
    assert json.loads((tmp_path / "a.json").read_text()) == {"reward": 1.5, "cost": {"new_tokens": 8}, "3": {"n": 1}}
    assert io.read_jsonl(tmp_path / "a.jsonl") == [{"reward": 1.5, "cost": {"new_tokens": 8}, "3": {"n": 1}}] * 2
    assert io.read_json(tmp_path / io.TIMING_FILE) == {"seconds": 2.0}


def test_write_stage_metrics_splits_headline_details_and_timing(tmp_path):
    details = {"n_prompts": 4, "by_budget": {str(n): {"reward": n / 10} for n in (1, 2, 4)}, "seconds": 9.0}
    io.write_stage_metrics(tmp_path, {"n_prompts": 4, "reward_at_N": 0.4, "ci": [0.1, 0.7]}, details,
                           {"seconds": 9.0, "load_seconds": 1.0})
    assert io.read_json(tmp_path / "metrics.json") == {"n_prompts": 4, "reward_at_N": 0.4, "ci": [0.1, 0.7]}
    assert io.read_json(tmp_path / "summary.json") == {k: v for k, v in details.items() if k != "seconds"}
    assert io.read_json(tmp_path / "timing.json") == {"seconds": 9.0, "load_seconds": 1.0}


@pytest.mark.parametrize("headline, timing, message", [
    ({f"k{i}": i for i in range(io.MAX_HEADLINE + 1)}, {"seconds": 1.0}, "at most 15"),
    ({"a": {f"k{i}": i for i in range(io.MAX_HEADLINE)}, "b": 1}, {"seconds": 1.0}, "at most 15"),  # nested leaves count
    ({"reward": 1.0, "seconds": 2.0}, {"seconds": 1.0}, "headline timing keys"),
    ({"reward": 1.0}, {"seconds": 1.0, "n_prompts": 3}, "not named as timing"),
])
def test_write_stage_metrics_refuses_a_long_or_timed_headline(tmp_path, headline, timing, message):
    with pytest.raises(ValueError, match=message):
        io.write_stage_metrics(tmp_path, headline, {}, timing)
    assert not list(tmp_path.iterdir())  # checked before anything is written


def test_scrub_merges_a_cells_consecutive_stream_outputs(tmp_path):
    """Where the kernel split a cell's printing is timing; scrubbed, two runs give the same notebook."""
    import nbformat

    from prelogit.nbtools import scrub

    cell = nbformat.v4.new_code_cell("print('a'); print('b')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="a\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="b\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="warning\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="c\n")]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))
    scrub(path)
    outputs = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [(o["name"], o["text"]) for o in outputs] == [("stdout", "a\nb\n"), ("stderr", "warning\n"), ("stdout", "c\n")]


def test_scrub_drops_progress_bar_widgets(tmp_path):
    """A cold model cache draws the GGUF conversion's progress bar, a warm one does not: scrubbed, both
    runs give the same notebook (the widget's own id is random, too)."""
    import nbformat

    from prelogit.nbtools import WIDGET_VIEW, scrub

    def executed(cold: bool):
        cell = nbformat.v4.new_code_cell("model = load_model()", id="load")
        bar = nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "ce26", "version_major": 2,
                                                                         "version_minor": 0},
                                                           "text/plain": "Converting ...:   0%|  | 0/272"})
        cell.outputs = ([bar] if cold else []) + [nbformat.v4.new_output("stream", name="stdout", text="loaded\n")]
        nb = nbformat.v4.new_notebook(cells=[cell])
        if cold:
            nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"ce26": {}}}}
        path = tmp_path / f"{cold}.ipynb"
        nbformat.write(nb, str(path))
        scrub(path)
        return path.read_bytes()

    cold = executed(True)
    assert cold == executed(False)
    assert b"widget" not in cold and b"loaded" in cold

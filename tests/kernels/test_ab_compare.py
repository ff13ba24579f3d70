"""scripts/ab_compare.py: the A/B runs of several processes side by side, and its errors."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import ab_compare  # noqa: E402


def record(seqlen, forward, s4, backward, pers):
    return dict(head_dim=128, seqlen=seqlen, causal=True, dropout_p=0.1,
                forward_candidates={"s4": "..."}, backward_candidates={"pers": "..."},
                median={"forward": forward, "s4": s4, "backward": backward, "pers": pers,
                        "cudnn_backward": 1.0})


def write(path, records):
    path.write_text(json.dumps(dict(card="test", records=records)))
    return path


def test_each_candidate_in_each_run_with_its_mean_and_verdict(tmp_path):
    a = write(tmp_path / "a.json", [record(2048, 0.2, 0.19, 1.28, 1.237)])
    b = write(tmp_path / "b.json", [record(2048, 0.2, 0.203, 1.281, 1.238)])
    lines = ab_compare.compare(ab_compare.load_runs([a, b]))
    assert lines == ["d=128 N=2048 causal=1 p=0.1  s4  -5.0 / +1.5 %  mean -1.8 %  mixed",
                     "d=128 N=2048 causal=1 p=0.1  pers  -3.4 / -3.4 %  mean -3.4 %  agree"]
    level = ab_compare.compare(ab_compare.load_runs([a, b]), threshold=6.0)
    assert level[0].endswith("level") and level[1].endswith("level")


def test_a_value_from_unsteady_rounds_is_marked_with_its_run(tmp_path):
    a = write(tmp_path / "a.json", [record(512, 0.2, 0.19, 1.28, 1.237)])
    disturbed = dict(record(512, 0.41, 0.36, 1.28, 1.237), unsteady={"forward": 209.1})
    b = write(tmp_path / "b.json", [disturbed])
    lines = ab_compare.compare(ab_compare.load_runs([a, b]))
    assert lines[0].endswith("unsteady in run 2") and "s4" in lines[0]
    assert not lines[1].endswith("unsteady in run 2")      # pers: neither it nor its default


def test_an_older_record_without_the_mark_is_judged_from_its_rounds(tmp_path):
    older = dict(record(512, 0.2, 0.19, 1.28, 1.237),
                 ms={"forward": [0.13, 0.41], "s4": [0.19, 0.19], "backward": [1.28], "pers": [1.24]})
    lines = ab_compare.compare(ab_compare.load_runs([write(tmp_path / "a.json", [older])]))
    assert lines[0].endswith("unsteady in run 1") and not lines[1].endswith("run 1")


def test_a_cell_missing_from_a_later_run_shows_the_runs_that_have_it(tmp_path):
    a = write(tmp_path / "a.json", [record(1024, 0.2, 0.21, 1.0, 1.0), record(2048, 0.2, 0.21, 1.0, 1.0)])
    b = write(tmp_path / "b.json", [record(2048, 0.2, 0.22, 1.0, 1.0)])
    lines = ab_compare.compare(ab_compare.load_runs([a, b]))
    assert "N=1024" in lines[0] and "+5.0 %  mean +5.0 %" in lines[0]
    assert "N=2048" in lines[2] and "+5.0 / +10.0 %" in lines[2]


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("{", "not JSON"),
                                              ('{"records": []}', "no ab_tiles.py records")])
def test_a_file_that_is_not_an_ab_run_is_named_with_the_reason(tmp_path, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        ab_compare.main([str(path)])
    assert message in str(exit_.value.code) and str(path) in str(exit_.value.code)

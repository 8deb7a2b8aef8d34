"""metrics.jsonl after a crash: a partial last line is dropped on resume, not fatal;
a bad line elsewhere is an error naming the file and the line."""

from __future__ import annotations

import pytest

from megatron_hpt.trainer.metrics_log import MetricsFileError, MetricsLogger, read_metrics


def _logger(tmp_path) -> MetricsLogger:
    return MetricsLogger(tmp_path, tensorboard=False)


def test_a_torn_last_line_is_dropped_on_resume_and_logging_continues(tmp_path):
    log = _logger(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss/total": 0.5 * step})
    with log.path.open("a") as f:
        f.write('{"step": 4, "loss/tot')  # killed mid-write
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    log.truncate_after(2)  # resumed from the step-2 checkpoint
    log.log(3, {"loss/total": 9.0})
    records = read_metrics(log.path)
    assert [(r["step"], r["loss/total"]) for r in records] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    assert log.path.read_text().endswith("}\n") and log.path.read_text().count("\n") == 3


def test_a_last_record_that_only_lost_its_newline_is_kept(tmp_path):
    log = _logger(tmp_path)
    log.log(1, {"a": 1.0})
    with log.path.open("a") as f:
        f.write('{"step": 2, "a": 2.0}')
    log.truncate_after(5)
    log.log(6, {"a": 6.0})
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 6]


def test_a_bad_line_before_the_last_names_the_file_and_line(tmp_path):
    log = _logger(tmp_path)
    log.log(1, {"a": 1.0})
    with log.path.open("a") as f:
        f.write('{"step": 2, "a"\n{"step": 3, "a": 3.0}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        log.truncate_after(3)
    with pytest.raises(MetricsFileError, match="line 2"):
        read_metrics(log.path)

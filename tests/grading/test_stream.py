"""Grading as rows finish (hbpo_jax.grading.stream): the verdicts of one grade_batch over all rows."""
import numpy as np
import pytest

from hbpo_jax.grading import answers as G
from hbpo_jax.grading import stream


def _resp(answer: str) -> str:
    return f"<think>hmm</think>\nSo the answer is $\\boxed{{{answer}}}$."


# Cheap verdicts and symbolic ones (the worker pool), some wrong, one without a box.
ITEMS = [(_resp("42"), "42"), (_resp("0.5"), "\\frac{1}{2}"), ("no answer here", "3"), (_resp("x+1"), "1+x"),
         (_resp("7"), "8"), (_resp("\\sqrt{4}"), "2"), (_resp("b+a"), "a+b"), (_resp("3/4"), "0.75")]


def test_rows_graded_in_pieces_equal_one_batch():
    texts, truths = zip(*ITEMS)
    want = G.grade_batch(list(texts), list(truths), workers=1)
    grader = stream.StreamGrader(workers=1)
    for rows in ([5, 0], [3], [7, 1, 2], [6, 4]):  # out of order, as rows finish
        grader.submit(rows, [texts[r] for r in rows], [truths[r] for r in rows])
    got = grader.results(len(ITEMS), timeout_s=120)
    assert [(g.format_ok, g.correct, g.extracted, g.status) for g in got] == \
           [(g.format_ok, g.correct, g.extracted, g.status) for g in want]


def test_a_row_twice_or_missing_is_an_error():
    grader = stream.StreamGrader(workers=0)
    grader.submit([0], [_resp("1")], ["1"])
    with pytest.raises(ValueError, match="submitted twice"):
        grader.submit([0], [_resp("1")], ["1"])
    with pytest.raises(ValueError, match="never submitted"):
        grader.results(2)
    assert grader.results(1)[0].correct


def test_a_pods_shares_graded_as_they_finish_gather_to_one_batch(monkeypatch):
    """Two hosts (faked): each streams only its share of the rows to its grader, in the order the
    rows finish, and hosts.gather gives both the verdicts of one grade_batch over all rows."""
    from jax.experimental import multihost_utils

    from hbpo_jax.grading import hosts
    texts, truths = zip(*ITEMS)
    want = G.grade_batch(list(texts), list(truths), workers=1)
    sent = {}

    def allgather(verdicts):  # each host's [size, 4] verdicts, stacked as process_allgather does
        sent[hosts.jax.process_index()] = verdicts
        return np.stack([sent.get(p, np.zeros_like(verdicts)) for p in range(2)])
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(hosts.jax, "process_count", lambda: 2)
    got = {}
    for process in (1, 0, 1):  # host 1 again once host 0's verdicts are in
        monkeypatch.setattr(hosts.jax, "process_index", lambda p=process: p)
        mine = hosts.share(len(ITEMS), process, 2)
        grader = stream.StreamGrader(workers=1)
        for rows in ([5, 0], [3], [7, 1, 2], [6, 4]):  # every host sees every finished row
            keep = [r for r in rows if r in mine]
            grader.submit(keep, [texts[r] for r in keep], [truths[r] for r in keep])
        got[process] = hosts.gather(grader.results(mine, timeout_s=120), list(texts))
    for process in (0, 1):
        assert [(g.format_ok, g.correct, g.extracted, g.status) for g in got[process]] == \
               [(g.format_ok, g.correct, g.extracted, g.status) for g in want]
    with pytest.raises(ValueError, match="local grades for a share"):
        hosts.gather(want[:1], list(texts))

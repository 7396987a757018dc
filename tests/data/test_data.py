"""Prompt data: reading / normalising problem sets (hbpo_jax.data.readers) and the grain batch iterator
(hbpo_jax.data.loader)."""
import json
import logging

import pandas as pd
import pytest

from hbpo_jax.data import readers as data
from hbpo_jax.data.loader import prompt_batches
from hbpo_jax.data.readers import load_records, write_jsonl
from hbpo_jax.errors import DataError


def _load(path, tmp_path, **kw):
    return load_records(path, cache_dir=str(tmp_path / "hf_cache"), **kw)


def _answers(batch):
    return [r["answer"] for r in batch]


DEEPSCALER = [
    {"problem": "What is 1+1?", "answer": "2", "solution": "1+1=2"},
    {"problem": "Compute 3*4.", "answer": "12", "solution": "..."},
    {"problem": "Find x if 2x=1.", "answer": "\\frac{1}{2}", "solution": "..."},
]


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_deepscaler_columns_each_format(tmp_path, fmt):
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, DEEPSCALER)
    elif fmt == "json":
        path.write_text(json.dumps(DEEPSCALER))
    else:
        pd.DataFrame(DEEPSCALER).to_parquet(path)
    records, report = _load(path, tmp_path)
    assert records == [{"problem": r["problem"], "answer": r["answer"]} for r in DEEPSCALER]
    assert report.total == 0 and report.rows_read == 3
    assert report.summary() == "skipped 0 of 3 rows"


def test_directory_and_format_override(tmp_path):
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    pd.DataFrame(DEEPSCALER[:2]).to_parquet(d / "train-00000.parquet")
    pd.DataFrame(DEEPSCALER[2:]).to_parquet(d / "test-00000.parquet")
    records, _ = _load(tmp_path / "ds", tmp_path, split="train")
    assert _answers(records) == ["2", "12"]
    odd = tmp_path / "rows.txt"
    write_jsonl(odd, DEEPSCALER)
    with pytest.raises(DataError, match="rows.txt"):
        _load(odd, tmp_path)
    assert len(_load(odd, tmp_path, format="jsonl")[0]) == 3


def test_gsm8k_preset(tmp_path):
    rows = [
        {"question": "Sum?", "answer": "He has 1000 + 234 = 1,234 apples.\n#### 1,234"},
        {"question": "Neg?", "answer": "so\n#### -5"},
        {"question": "Frac?", "answer": "#### 2.5"},
        {"question": "No marker?", "answer": "the answer is 7"},
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    records, report = _load(path, tmp_path, field_map="gsm8k")
    assert records == [{"problem": "Sum?", "answer": "1234"}, {"problem": "Neg?", "answer": "-5"},
                       {"problem": "Frac?", "answer": "2.5"}]
    assert report.counts == {"answer_unparsed": 1} and report.examples == {"answer_unparsed": [3]}


def test_olympiadbench_list_answers(tmp_path):
    rows = [
        {"question": "One?", "final_answer": ["$\\frac{1}{2}$"], "id": 1},
        {"question": "Two?", "final_answer": ["3", "4"], "id": 2},
        {"question": "None?", "final_answer": [], "id": 3},
    ]
    path = tmp_path / "olympiad.parquet"
    pd.DataFrame(rows).to_parquet(path)
    records, report = _load(path, tmp_path, field_map="olympiadbench")
    assert records == [{"problem": "One?", "answer": "$\\frac{1}{2}$"},
                       {"problem": "Two?", "answer": "3, 4"}]
    assert report.counts == {"answer_missing": 1}


def test_math500_level_passthrough_and_user_mapping(tmp_path):
    rows = [{"problem": f"P{i}", "answer": str(i), "level": i % 5 + 1, "subject": "Algebra"}
            for i in range(4)]
    path = write_jsonl(tmp_path / "math500.jsonl", rows)
    records, _ = _load(path, tmp_path, field_map="math500")
    assert records[2] == {"problem": "P2", "answer": "2", "level": 3}
    rows = [{"q": "Q", "a": 7, "difficulty": 2.5}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    records, _ = _load(path, tmp_path, field_map={"problem": "q", "answer": "a"})
    assert records == [{"problem": "Q", "answer": "7", "difficulty": 2.5}]
    with pytest.raises(DataError, match="field_map"):
        _load(path, tmp_path, field_map={"problem": "q"})
    with pytest.raises(DataError, match="preset"):
        _load(path, tmp_path, field_map="nope")


def test_skips_counted_by_reason(tmp_path, caplog):
    rows = [
        {"problem": "ok", "answer": "1"},
        {"problem": "no answer", "answer": None},
        {"problem": "empty", "answer": "   "},
        {"problem": "long", "answer": "9" * (data.MAX_ANSWER_CHARS + 1)},
        {"problem": "", "answer": "3"},
        {"problem": "bool", "answer": True},
        {"problem": "dict", "answer": {"x": 1}},
        {"problem": "int", "answer": 42},
        {"problem": "float", "answer": 3.0},
        {"problem": "nan", "answer": float("nan")},
        {"problem": "another missing", "answer": None},
        {"problem": "missing key"},
    ]
    path = write_jsonl(tmp_path / "dirty.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hbpo_jax.data.readers"):
        records, report = _load(path, tmp_path)
    assert [(r["problem"], r["answer"]) for r in records] == [("ok", "1"), ("int", "42"),
                                                              ("float", "3")]
    assert report.counts == {"answer_missing": 4, "answer_empty": 1, "answer_too_long": 1,
                             "problem_missing": 1, "answer_not_text": 2}  # NaN counts as missing
    assert report.total == 9 and report.rows_read == 12
    assert report.examples["answer_missing"] == [1, 9, 10]
    summary = report.summary()
    assert "\n" not in summary and summary.startswith("skipped 9 of 12 rows")
    assert "answer_missing=4 (rows 1, 9, 10, ...)" in summary
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dirty.jsonl" in warnings[0].getMessage()


def test_max_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": f"p{i}", "answer": str(i)}
                                               for i in range(10)])
    records, report = _load(path, tmp_path, max_rows=4)
    assert _answers(records) == ["0", "1", "2", "3"] and report.rows_read == 4


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl.*does not exist"):
        _load(tmp_path / "nothere.jsonl", tmp_path)


def test_error_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="agentica-org/DeepScaleR-Preview-Dataset.*offline"):
        _load("agentica-org/DeepScaleR-Preview-Dataset", tmp_path)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("w.jsonl", "\n  \n"),
                                          ("e.json", ""), ("l.json", "[]"),
                                          ("e.parquet", b"")])
def test_error_empty_file(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DataError, match=f"{name}.*empty"):
        _load(path, tmp_path)


def test_error_no_rows_left(tmp_path):
    path = write_jsonl(tmp_path / "useless.jsonl", [{"problem": "a", "answer": None},
                                                    {"problem": "b", "answer": ""}])
    with pytest.raises(DataError, match="useless.jsonl.*answer_missing=1"):
        _load(path, tmp_path)


def test_error_columns_missing(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"gsm.jsonl.*'problem'.*columns found: \['question', "
                                        r"'answer'\]"):
        _load(path, tmp_path)


def test_error_malformed_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": 2\n')
    with pytest.raises(DataError, match="bad.jsonl.*line 2"):
        _load(path, tmp_path)
    path = tmp_path / "bad.json"
    path.write_text('[{"problem": "p", "answer": "1"},')
    with pytest.raises(DataError, match="bad.json"):
        _load(path, tmp_path)
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="bad.parquet"):
        _load(path, tmp_path)


def test_write_jsonl_roundtrip(tmp_path):
    rows = [{"problem": "π?", "answer": "3.14", "level": 2}]
    path = write_jsonl(tmp_path / "sub" / "x.jsonl", rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


# ----------------------------------------------------------------------------- batching


RECORDS = [{"problem": f"p{i}", "answer": str(i)} for i in range(23)]


def _take(it, k):
    return [_answers(next(it)) for _ in range(k)]


def test_shuffle_reproducible_and_seeded():
    a = _take(prompt_batches(RECORDS, batch_size=4, seed=1, process_index=0, process_count=1), 5)
    b = _take(prompt_batches(RECORDS, batch_size=4, seed=1, process_index=0, process_count=1,
                             prefetch=0), 5)
    c = _take(prompt_batches(RECORDS, batch_size=4, seed=2, process_index=0, process_count=1), 5)
    assert a == b and a != c
    assert all(len(x) == 4 for x in a)
    assert len({r for batch in a for r in batch}) == 20  # no repeats inside one epoch
    plain = _take(prompt_batches(RECORDS, batch_size=5, seed=0, shuffle=False, process_index=0,
                                 process_count=1), 2)
    assert plain == [[str(i) for i in range(5)], [str(i) for i in range(5, 10)]]


def test_epochs_reshuffle_and_cover():
    n = len(RECORDS)
    it = prompt_batches(RECORDS, batch_size=n, seed=3, process_index=0, process_count=1)
    epochs = _take(it, 4)
    assert all(sorted(e, key=int) == [str(i) for i in range(n)] for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # each epoch reshuffled


def test_finite_epochs_drop_partial_batch():
    it = prompt_batches(RECORDS, batch_size=5, seed=0, num_epochs=2, process_index=0,
                        process_count=1)
    batches = [_answers(b) for b in it]
    assert len(batches) == 2 * 23 // 5
    flat = [a for b in batches for a in b]
    assert sorted(flat[:23], key=int) == [r["answer"] for r in RECORDS]  # epoch 0 complete
    with pytest.raises(DataError, match="batch_size"):
        prompt_batches(RECORDS, batch_size=50, seed=0, num_epochs=1, process_index=0,
                       process_count=1)


def test_infinite_epochs():
    it = prompt_batches(RECORDS[:3], batch_size=2, seed=0, process_index=0, process_count=1)
    batches = _take(it, 60)  # 40 epochs of 3 records
    flat = [a for b in batches for a in b]
    for e in range(40):
        assert sorted(flat[3 * e:3 * e + 3]) == ["0", "1", "2"]
    assert len({tuple(flat[3 * e:3 * e + 3]) for e in range(40)}) > 1


@pytest.mark.parametrize("count", [2, 4])
def test_process_sharding_disjoint_and_covering(count):
    glob = _take(prompt_batches(RECORDS, batch_size=8, seed=5, process_index=0, process_count=1),
                 6)
    per = [_take(prompt_batches(RECORDS, batch_size=8, seed=5, process_index=p,
                                process_count=count), 6) for p in range(count)]
    for step in range(6):
        parts = [per[p][step] for p in range(count)]
        assert all(len(x) == 8 // count for x in parts)
        assert [a for x in parts for a in x] == glob[step]  # concatenation = global batch
        within_epoch = step < 2  # steps 0-1 hold positions 0..15 < 23: one epoch, no repeats
        if within_epoch:
            assert len({a for x in parts for a in x}) == 8
    with pytest.raises(DataError, match="divisible"):
        prompt_batches(RECORDS, batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(DataError, match="process_index"):
        prompt_batches(RECORDS, batch_size=8, seed=0, process_index=2, process_count=2)


def test_process_defaults_from_jax():
    import jax

    it = prompt_batches(RECORDS, batch_size=4, seed=0)
    assert len(next(it)) == 4 // jax.process_count()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_checkpoint_resume_equal(prefetch):
    def make(**kw):
        return prompt_batches(RECORDS, batch_size=4, seed=7, process_index=1, process_count=2,
                              prefetch=prefetch, **kw)

    it = make()
    _take(it, 7)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # JSON-serialisable
    expected = _take(it, 5)
    it.close()
    fresh = make()
    fresh.set_state(state)
    assert fresh.step == 7
    assert _take(fresh, 5) == expected
    # The same state restores on a different process count (global order is topology-free).
    whole = prompt_batches(RECORDS, batch_size=4, seed=7, process_index=0, process_count=1)
    whole.set_state(state)
    assert [b[2:] for b in _take(whole, 5)] == expected
    # A state from another pipeline is refused, naming the difference.
    other = prompt_batches(RECORDS, batch_size=4, seed=8, process_index=0, process_count=1)
    with pytest.raises(DataError, match="seed: 7 vs 8"):
        other.set_state(state)
    with pytest.raises(DataError, match="version"):
        other.set_state({"next_index": 3})


def test_batches_are_copies():
    it = prompt_batches(RECORDS, batch_size=2, seed=0, shuffle=False, process_index=0,
                        process_count=1, prefetch=0)
    next(it)[0]["answer"] = "tampered"
    assert RECORDS[0]["answer"] == "0"


def test_load_then_batch(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    records, _ = _load(path, tmp_path)
    it = prompt_batches(records, batch_size=6, seed=0, process_index=0, process_count=1)
    seen = [a for _ in range(3) for a in _answers(next(it))]
    assert len(set(seen)) == 18 and set(seen) <= set(_answers(records))

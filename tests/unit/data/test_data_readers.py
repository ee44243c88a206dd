"""Readers: every file type, exact `file:line` locations, column renames, limits, and malformed input."""

from __future__ import annotations

import json

import pytest

from sftlab.data import DataError, read_records


def _where(recs):
    return [r.where.rsplit(":", 1)[1] for r in recs]


def test_jsonl_lines_skip_blanks(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    recs = read_records(f)
    assert [r.fields for r in recs] == [{"text": "a"}, {"text": "b"}]
    assert [r.where for r in recs] == [f"{f}:1", f"{f}:3"]


def test_json_list_records_located_by_their_opening_line(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"text": "a"}, {"text": "b\nc"}, {"text": "d"}], indent=2))
    recs = read_records(f)
    assert [r.fields["text"] for r in recs] == ["a", "b\nc", "d"]
    # indent=2 puts each record's "{" on lines 2, 5, 8
    assert _where(recs) == ["2", "5", "8"]


def test_json_file_holding_json_lines(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r.fields["text"] for r in read_records(f)] == ["a", "b"]


def test_csv_multiline_quoted_row_keeps_its_start_line(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('text,label\n"one\ntwo",pos\nthree,neg\n')
    recs = read_records(f)
    assert [r.fields for r in recs] == [
        {"text": "one\ntwo", "label": "pos"},
        {"text": "three", "label": "neg"},
    ]
    assert _where(recs) == ["2", "4"]


def test_tsv_header_rename_and_quotes_kept(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text('sentence\tlabel\nsays "hi" there\t1\n')
    recs = read_records(f, columns={"text": "sentence"})
    assert recs[0].fields == {"text": 'says "hi" there', "label": "1"}
    assert _where(recs) == ["2"]


def test_headerless_tsv_by_column_numbers(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("good movie\tpos\nbad one\tneg\n")
    recs = read_records(f, columns={"text": "0", "label": "1"})
    assert [r.fields for r in recs] == [
        {"text": "good movie", "label": "pos"},
        {"text": "bad one", "label": "neg"},
    ]
    assert _where(recs) == ["1", "2"]


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"source": ["x", "y"], "target": ["1", "2"]}), f)
    recs = read_records(f)
    assert [r.fields for r in recs] == [{"source": "x", "target": "1"}, {"source": "y", "target": "2"}]
    assert _where(recs) == ["1", "2"]


def test_txt_one_record_per_nonempty_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first\n\nsecond\n")
    recs = read_records(f)
    assert [(r.fields["text"], r.where) for r in recs] == [("first", f"{f}:1"), ("second", f"{f}:3")]


def test_directory_sorted_and_limit(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n')
    (tmp_path / "a.txt").write_text("a1\na2\n")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "no"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    assert [r.fields["text"] for r in read_records(tmp_path)] == ["a1", "a2", "b1", "b2"]
    assert [r.fields["text"] for r in read_records(tmp_path, limit=3)] == ["a1", "a2", "b1"]


@pytest.mark.parametrize(
    "name,content,columns,message",
    [
        (
            "t.jsonl",
            '{"text": "a"}\n{"text": "b",}\n',
            None,
            r"t\.jsonl:2: invalid JSON: Expecting property name.*column 14",
        ),
        (
            "t.jsonl",
            '{"text": "a"}\n["not", "an object"]\n',
            None,
            r"t\.jsonl:2: expected a JSON object \(got list",
        ),
        ("t.json", '[\n  {"text": "a"},\n  {"text": "b"\n  "x": 1}\n]', None, r"t\.json:4: invalid JSON"),
        ("t.tsv", "text\tlabel\na\t1\nb\n", None, r"t\.tsv:3: expected 2 tab-separated fields .* \(got 1"),
        ("t.csv", "sentence,label\na,1\n", {"text": "sent"}, r"t\.csv:2: sent: missing column"),
        ("t.xml", "<a/>", None, r"unsupported file type '\.xml'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, content, columns, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_records(f, columns=columns)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_bom_and_non_utf8(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes("\ufefftext,label\nhi,1\n".encode())
    assert read_records(f)[0].fields == {"text": "hi", "label": "1"}
    g = tmp_path / "latin.txt"
    g.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8 text"):
        read_records(g)


def test_trec_label_file_is_latin1_coarse_fine_lines(tmp_path):
    f = tmp_path / "train_5500.label"
    f.write_bytes(
        "DESC:manner How did serfdom develop ?\n\nHUM:ind Who wrote caf\xe9 songs ?\n".encode("latin-1")
    )
    recs = read_records(f)
    assert _where(recs) == ["1", "3"]
    assert recs[1].fields == {"text": "Who wrote café songs ?", "label": "HUM", "fine_label": "HUM:ind"}
    bad = tmp_path / "bad.label"
    bad.write_text("DESC:manner fine\nnot a tagged line\n")
    with pytest.raises(DataError, match=r"bad\.label:2: expected a TREC line `COARSE:fine question text`"):
        read_records(bad)

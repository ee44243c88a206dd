"""Read raw records from local files, each tagged with its source `file:line` for error messages.

Supported: .json (a list of records, or JSON lines), .jsonl, .csv, .tsv, .parquet, .txt, .label (TREC's
`COARSE:fine question` lines in ISO-8859-1: {text, label: COARSE, fine_label}), or a directory of
them (read recursively in sorted path order, hidden files skipped). Locations are 1-based lines: the line a
JSON-lines record is on, the line a JSON-list record's `{` starts on, the line a CSV/TSV row starts on (the
header is line 1), the row number for parquet (no lines there). A .txt file gives one record `{"text": line}`
per non-empty line (line-per-document, as in wiki dumps), or with `documents="paragraph"` one per run of non-blank
lines (blank lines separate documents, lines inside one are joined with "\n"), or with `documents="file"` one
for the whole file (`data.documents`).

CSV/TSV files have a header row, unless every value in `columns` is a column number ("0", "1", ...) that
is not a header name: then the file is read headerless with fields named "0", "1", ... (GLUE's RTE val.tsv
and AG News dev.tsv ship without headers). TSV is read without quote handling, as GLUE files expect.

`hf:ORG/NAME[:split]` (split default train; `subset` the configuration) reads a Hugging Face dataset through
`datasets.load_dataset`, from the local datasets cache when offline; a record's location is `hf:ORG/NAME:split:row`
(1-based) and a ClassLabel column gives its class names, not their indices.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from ..errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".label")


@dataclass
class RawRecord:
    """One record as read from disk: its fields, and where it came from (`path:line`)."""

    where: str
    fields: dict[str, Any]


def short(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut short so one bad record cannot flood the terminal."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def field_list(fields: dict) -> str:
    return short(", ".join(map(str, fields)), 80).strip("'\"") if fields else "no fields"


def list_files(path: str | Path) -> list[Path]:
    """The data files under `path` (itself if it is a file)."""
    if is_hub_name(path):
        raise DataError(f"{path}: a Hub dataset is read through `datasets`, not as local files")
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
        return [p]
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"{p}: directory holds no {', '.join(SUFFIXES)} files")
        return files
    raise DataError(f"{p}: data file or directory does not exist")


def read_records(
    path: str | Path,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    documents: str = "line",
    subset: str | None = None,
) -> list[RawRecord]:
    """All records under `path` (first `limit` if given), with `columns` renames applied (new name: old name);
    `documents`: how a .txt file splits into records (line | paragraph | file); `subset`: an `hf:` dataset's
    configuration."""
    return list(iter_records(path, columns, limit, documents, stream=False, subset=subset))


def iter_records(
    path: str | Path,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    documents: str = "line",
    stream: bool = True,
    subset: str | None = None,
) -> Iterator[RawRecord]:
    """read_records' records one at a time. With `stream`, .txt (line, paragraph) and .jsonl files are read line by
    line, never whole, so a corpus of any size passes through in constant memory (the same records, the same
    errors); .csv/.tsv always stream; .json, .parquet and `documents: file` are read whole."""
    n = 0
    if limit is not None and limit <= 0:
        return
    if is_hub_name(path):
        for rec in _read_hub(str(path), subset, limit):
            yield _rename(rec, columns or {})
        return
    for f in list_files(path):
        for rec in _read_file(f, columns or {}, documents, stream):
            yield _rename(rec, columns or {})
            n += 1
            if limit is not None and n >= limit:
                return


def _rename(rec: RawRecord, columns: dict[str, str]) -> RawRecord:
    if not columns:
        return rec
    fields = dict(rec.fields)
    for new, old in columns.items():
        if old not in rec.fields:
            raise DataError(
                f"{rec.where}: {old}: missing column (data.columns maps it to {new!r}); "
                f"record has {field_list(rec.fields)}"
            )
        fields.pop(old, None)
    for new, old in columns.items():
        fields[new] = rec.fields[old]
    return RawRecord(rec.where, fields)


def _read_file(
    f: Path, columns: dict[str, str], documents: str = "line", stream: bool = False
) -> Iterator[RawRecord]:
    try:
        yield from _read_any(f, columns, documents, stream)
    except UnicodeDecodeError as e:
        raise _not_utf8(f, e.reason, e.start) from None


def _not_utf8(f: Path, reason: str, byte: int) -> DataError:
    return DataError(
        f"{f}: not UTF-8 text ({reason} at byte {byte}); convert it first, e.g. iconv -f latin1 -t utf-8"
    )


def _lines(f: Path, stream: bool) -> Iterator[str] | list[str]:
    """The file's lines as str.splitlines() of its whole text (UTF-8, a BOM dropped) gives them; with `stream`, read
    a line at a time (the same lines: splitlines of each \n-ended piece; the same error, at the same byte)."""
    if not stream:
        return f.read_text(encoding="utf-8-sig").splitlines()
    return _stream_lines(f)


def _stream_lines(f: Path) -> Iterator[str]:
    pos = 0  # bytes read after the BOM: where a decoding error is, as read_text reports it
    with f.open("rb") as fh:
        for i, raw in enumerate(fh):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f, e.reason, pos + e.start) from None
            pos += len(raw)
            yield from text.splitlines()


def _read_any(
    f: Path, columns: dict[str, str], documents: str = "line", stream: bool = False
) -> Iterator[RawRecord]:
    suffix = f.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(f, _lines(f, stream))
    elif suffix == ".json":
        yield from _read_json(f)
    elif suffix in (".csv", ".tsv"):
        yield from _read_delimited(f, "\t" if suffix == ".tsv" else ",", columns)
    elif suffix == ".parquet":
        yield from _read_parquet(f)
    elif suffix == ".label":
        yield from _read_label(f)
    else:
        yield from _read_txt(f, documents, stream)


def _object(f: Path, line: int, value: Any) -> RawRecord:
    if not isinstance(value, dict):
        raise DataError(f"{f}:{line}: expected a JSON object (got {type(value).__name__} {short(value)})")
    return RawRecord(f"{f}:{line}", value)


def _read_jsonl(f: Path, lines: Iterable[str]) -> Iterator[RawRecord]:
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield _object(f, i, value)


def _read_json(f: Path) -> Iterator[RawRecord]:
    """A JSON list of objects (each located by the line its `{` is on), or JSON lines in a .json file."""
    text = f.read_text(encoding="utf-8-sig")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return
    if text[start] != "[":
        yield from _read_jsonl(f, text.splitlines())
        return
    decoder = json.JSONDecoder()
    pos, line = start + 1, text.count("\n", 0, start) + 1
    last = start
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{f}:{line}: invalid JSON: unterminated list")
        if text[pos] == "]":
            return
        if not expect_value:
            if text[pos] != ",":
                line += text.count("\n", last, pos)
                last = pos
                raise DataError(f"{f}:{line}: invalid JSON: expected ',' or ']' between records")
            pos += 1
            expect_value = True
            continue
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield _object(f, line, value)
        expect_value = False


def _read_delimited(f: Path, delimiter: str, columns: dict[str, str]) -> Iterator[RawRecord]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with f.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            first = next(reader)
        except StopIteration:
            return
        wanted = list(columns.values())
        headerless = bool(wanted) and all(c.isdigit() for c in wanted) and not any(c in first for c in wanted)
        header = [str(i) for i in range(len(first))] if headerless else first
        rows = _with_lines(reader, reader.line_num, (1, first) if headerless else None)
        for line, row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{f}:{line}: expected {len(header)} {'tab' if delimiter == chr(9) else 'comma'}-separated "
                    f"fields ({', '.join(header)}) (got {len(row)}: {short(row)})"
                )
            yield RawRecord(f"{f}:{line}", dict(zip(header, row)))


def _with_lines(
    reader, prev_line: int, first_row: tuple[int, list[str]] | None
) -> Iterator[tuple[int, list[str]]]:
    """(start line, row) pairs; a quoted field may span lines, so a row starts after the previous one ends."""
    if first_row is not None:
        yield first_row
    for row in reader:
        yield prev_line + 1, row
        prev_line = reader.line_num


def _read_parquet(f: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield RawRecord(f"{f}:{i}", row)


def _read_txt(f: Path, documents: str = "line", stream: bool = False) -> Iterator[RawRecord]:
    if documents == "file":
        text = f.read_text(encoding="utf-8-sig")
        if text.strip():
            yield RawRecord(f"{f}:1", {"text": text})
        return
    para: list[str] = []
    start = 0
    lines = chain(_lines(f, stream), [""])  # a last blank line ends the last paragraph
    for i, line in enumerate(lines, start=1):
        if documents == "line" and line.strip():
            yield RawRecord(f"{f}:{i}", {"text": line})
        elif documents == "paragraph" and line.strip():
            start = start or i
            para.append(line)
        elif para:
            yield RawRecord(f"{f}:{start}", {"text": "\n".join(para)})
            para, start = [], 0


def _read_label(f: Path) -> Iterator[RawRecord]:
    """TREC question classification (`train_5500.label`, `TREC_10.label`): one `COARSE:fine question` per line, in
    ISO-8859-1 (so never a decoding error). A record is {text, label: COARSE, fine_label: COARSE:fine}: the six
    coarse classes by default, `columns: {label: fine_label}` for the fifty fine ones."""
    for i, line in enumerate(f.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, text = line.strip().partition(" ")
        coarse, colon, fine = tag.partition(":")
        if not colon or not coarse or not fine or not text.strip():
            raise DataError(f"{f}:{i}: expected a TREC line `COARSE:fine question text` (got {short(line)})")
        yield RawRecord(f"{f}:{i}", {"text": text.strip(), "label": coarse, "fine_label": tag})


HUB_PREFIX = "hf:"


def is_hub_name(path: str | Path) -> bool:
    """`hf:ORG/NAME[:split]`: a dataset read through `datasets.load_dataset` rather than a local path."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def _read_hub(spec: str, subset: str | None, limit: int | None) -> Iterator[RawRecord]:
    """Records of `hf:ORG/NAME[:split]` (split default train), from the Hub or, offline, the local datasets cache;
    a DataError names the cache directory when the dataset is in neither."""
    name, _, split = spec[len(HUB_PREFIX) :].partition(":")
    split = split or "train"
    if not name or name.count("/") > 1 or not split:
        raise DataError(
            f"{spec}: expected hf:ORG/NAME or hf:ORG/NAME:split (e.g. hf:nyu-mll/glue:validation)"
        )
    import datasets

    what = f"{name}" + (f" (subset {subset})" if subset else "")
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except (
        Exception
    ) as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, its own errors...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        cache = datasets.config.HF_DATASETS_CACHE
        if "split" in first.lower() and "should be one of" in first.lower():
            raise DataError(f"{spec}: no split {split!r} in {what}: {first}") from None
        if "config" in first.lower() and ("missing" in first.lower() or "available" in str(e).lower()):
            detail = " ".join(str(e).split())[:300]
            raise DataError(f"{spec}: data.subset: {detail}") from None
        raise DataError(
            f"{spec}: cannot load {what}, split {split}: it is not in the local datasets cache ({cache}) and "
            f"could not be fetched ({first}). Download it once online (datasets.load_dataset({name!r}"
            + (f", {subset!r}" if subset else "")
            + ")), or point HF_DATASETS_CACHE at a cache that holds it; offline, set HF_HUB_OFFLINE=1"
        ) from None
    class_names = {
        col: feat.names for col, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)
    }
    for i, row in enumerate(ds, start=1):
        if limit is not None and i > limit:
            return
        for col, names in class_names.items():
            v = row.get(col)
            if isinstance(v, int) and 0 <= v < len(names):
                row[col] = names[v]
        yield RawRecord(f"{spec}:{i}", row)

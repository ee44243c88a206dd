"""Token blocks kept on disk and memory-mapped, so a text corpus of any size costs a few bytes a block in Python.

`BlockWriter` appends blocks (lists of token ids) to an Arrow IPC stream file, the on-disk format of `datasets`
(`datasets.Dataset.from_file` opens it: a `list<int32>` column `input_ids`), in record batches of at most `BATCH`
blocks and `BATCH_TOKENS` tokens. `BlockWriter.finish` memory-maps the file and unlinks it at once: the mapping keeps the data alive for as long as the
`BlockStore` lives, and nothing is left in the temp directory (`TMPDIR`) when the process ends, however it ends.

`BlockStore` is a read-only sequence of examples, `{"input_ids": [...]}` (+ `"labels"`: a copy, for causal LM), as
the in-memory corpus's list holds them: `store[i]` slices the mapped ids, so only the blocks a batch reads are ever
Python lists. `lengths` (numpy) holds every block's length; `arrays()` yields the mapped ids batch by batch, for
counting without making lists.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from itertools import chain

import numpy as np
import pyarrow as pa

BATCH = 1024  # blocks per Arrow record batch at most ...
BATCH_TOKENS = 1 << 16  # ... and tokens: what a writer holds in Python lists at once (~0.6 MB)
SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])


class BlockWriter:
    """Appends blocks to a temporary Arrow file; `finish()` turns it into a BlockStore."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="sftlab-blocks-", suffix=".arrow")
        os.close(fd)
        self._sink = pa.OSFile(self.path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._pending: list[list[int]] = []
        self._tokens = 0

    def add(self, block: list[int]) -> None:
        self._pending.append(block)
        self._tokens += len(block)
        if len(self._pending) >= BATCH or self._tokens >= BATCH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        offsets = np.zeros(len(self._pending) + 1, dtype=np.int32)
        np.cumsum([len(b) for b in self._pending], out=offsets[1:])
        values = np.fromiter(chain.from_iterable(self._pending), dtype=np.int32, count=int(offsets[-1]))
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        self._writer.write_batch(pa.record_batch([column], schema=SCHEMA))
        self._pending, self._tokens = [], 0

    def finish(self, labels: bool) -> BlockStore:
        """Close the file and map it (`labels`: each example carries a copy of its ids as labels, for clm)."""
        try:
            self._flush()
            self._writer.close()
            self._sink.close()
            return BlockStore(self.path, labels)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the file (a mapped store keeps its data; an unfinished one is gone)."""
        if not self._sink.closed:
            self._sink.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class BlockStore(Sequence):
    """The blocks of an Arrow file, memory-mapped (see the module doc)."""

    def __init__(self, path: str, labels: bool) -> None:
        table = pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()
        chunks = table.column("input_ids").chunks
        # per record batch: its flat ids (mapped, not copied) and its blocks' offsets into them
        self._values = [c.values.to_numpy(zero_copy_only=True) for c in chunks]
        self._offsets = [c.offsets.to_numpy(zero_copy_only=True) for c in chunks]
        sizes = [len(o) - 1 for o in self._offsets]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.lengths = (
            np.concatenate([np.diff(o) for o in self._offsets]) if chunks else np.zeros(0, np.int32)
        )
        self.labels = labels

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _example(self, ids: list[int]) -> dict:
        return {"input_ids": ids, "labels": list(ids)} if self.labels else {"input_ids": ids}

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not isinstance(index, int | np.integer):
            raise TypeError(f"BlockStore indices are ints (got {type(index).__name__})")
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        off, j = self._offsets[k], i - int(self._starts[k])
        return self._example(self._values[k][off[j] : off[j + 1]].tolist())

    def __iter__(self) -> Iterator[dict]:
        for values, off in zip(self._values, self._offsets):
            for j in range(len(off) - 1):
                yield self._example(values[off[j] : off[j + 1]].tolist())

    def arrays(self) -> Iterator[np.ndarray]:
        """Every block's ids, one record batch's worth at a time, as mapped int32 arrays."""
        yield from self._values


class Corrupted(Sequence):
    """A corpus's blocks as `transform(block, epoch, index, stream)` rewrites them, computed on access: the streamed
    eval set, corrupted once (the same examples an in-memory list of them holds)."""

    def __init__(self, blocks: Sequence, transform, epoch: int, stream: int) -> None:
        self.blocks, self.transform, self.epoch, self.stream = blocks, transform, epoch, stream

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        i = int(index) + (len(self) if index < 0 else 0)
        return self.transform(self.blocks[i], self.epoch, i, self.stream)

    def __iter__(self) -> Iterator[dict]:
        for i, block in enumerate(self.blocks):
            yield self.transform(block, self.epoch, i, self.stream)

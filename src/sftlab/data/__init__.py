"""Data pipeline: read records -> validate into canonical shapes -> render -> encode -> batch.

Public API: `load_data`, `encode_dataset`, `encode_prompt`, `EncodedData`, `DataError`, `read_records`,
`epoch_batches`, `token_budget_batches`, `collate`, `collate_packed`, `supervised_segments`.
"""

from .batching import IGNORE, collate, collate_packed, epoch_batches, example_lengths, token_budget_batches
from .encode import EncodedData, encode_dataset, encode_prompt, supervised_segments
from .formats import FORMATS, Chat, Labeled, Pair, Text, Turn, parse_record
from .load import load_data, split_eval
from .readers import DataError, RawRecord, read_records
from .templates import get_template

__all__ = [
    "FORMATS",
    "IGNORE",
    "Chat",
    "DataError",
    "EncodedData",
    "Labeled",
    "Pair",
    "RawRecord",
    "Text",
    "Turn",
    "collate",
    "collate_packed",
    "encode_dataset",
    "encode_prompt",
    "epoch_batches",
    "example_lengths",
    "get_template",
    "load_data",
    "parse_record",
    "read_records",
    "split_eval",
    "supervised_segments",
    "token_budget_batches",
]

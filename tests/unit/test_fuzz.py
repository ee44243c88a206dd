"""Property-based fuzzing of what a user hands sftlab: data files, config files and overrides, commands against an
existing run. Whatever the input, sftlab either accepts it or raises one of its own errors (SftlabError: a message
naming the file/record/key), and a command that fails leaves an existing run directory byte-identical.

Example counts are kept small so the fast tier stays fast; HYPOTHESIS_PROFILE=deep runs many more."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import yaml
from helpers import alpaca_rows, classification_rows, file_tree, make_config, messages_rows, seq2seq_rows

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sftlab import hub  # noqa: E402
from sftlab.cli.main import main  # noqa: E402
from sftlab.config import DataConfig, load_config  # noqa: E402
from sftlab.data import load_data  # noqa: E402
from sftlab.errors import SftlabError  # noqa: E402

settings.register_profile(
    "fast", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# -- generators ---------------------------------------------------------------------------------------------

FIELD_NAMES = [
    "instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value",
    "text", "label", "source", "target", "system", "history", "0", "1", "sentence",
]  # fmt: skip
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", "tool", "", "USER"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ROLES),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=5)

VALID = {  # (task, format) -> a few valid rows, mutated below
    ("causal-lm", "alpaca"): alpaca_rows(3),
    ("causal-lm", "messages"): messages_rows(3),
    ("causal-lm", "text"): [{"text": "a b c"}, {"text": "d e"}],
    ("seq-cls", "classification"): classification_rows(4),
    ("seq2seq", "seq2seq"): seq2seq_rows(3),
}
TASK_FORMATS = list(VALID) + [("causal-lm", "sharegpt"), ("causal-lm", "classification")]


def _valid_text(rows: list[dict], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if suffix == ".json":
        return json.dumps(rows, indent=1)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        keys = list(rows[0])
        lines = [sep.join(keys)] + [sep.join(str(r.get(k, "")) for k in keys) for r in rows]
        return "\n".join(lines) + "\n"
    return "\n".join(str(next(iter(r.values()))) for r in rows) + "\n"


@st.composite
def data_files(draw):
    """(suffix, bytes): a valid file mutated, or random records serialised, or random bytes."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"]))
    kind = draw(st.sampled_from(["mutated", "records", "bytes"]))
    if kind == "bytes" or suffix == ".parquet":
        return suffix, draw(st.binary(max_size=200))
    if kind == "records":
        rows = draw(st.lists(records, max_size=5))
        if suffix == ".jsonl":
            text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        elif suffix == ".json":
            text = json.dumps(rows, default=str)
        else:
            text = _valid_text(
                [{k: json.dumps(v, default=str) for k, v in r.items()} or {"x": ""} for r in rows]
                or [{"x": ""}],
                suffix,
            )
        return suffix, text.encode("utf-8", "surrogatepass")
    rows = VALID[draw(st.sampled_from(list(VALID)))]
    data = bytearray(_valid_text(rows, suffix).encode())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "insert", "flip", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "cut" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "insert":
            data[pos:pos] = draw(
                st.sampled_from([b"{", b"}", b"[", b'"', b",", b"\n", b"\t", b"\xff", b"\x00", b"null"])
            )
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
    return suffix, bytes(data)


# -- data files ----------------------------------------------------------------------------------------------

TOKENIZERS = {}


def _tokenizer(task: str):
    name = {"causal-lm": "tiny-llama", "seq-cls": "tiny-bert", "seq2seq": "tiny-t5"}[task]
    if name not in TOKENIZERS:
        TOKENIZERS[name] = hub.load_tokenizer(name)
    return TOKENIZERS[name]


@given(
    file=data_files(),
    task_format=st.sampled_from(TASK_FORMATS),
    columns=st.one_of(
        st.just({}), st.dictionaries(st.sampled_from(FIELD_NAMES), st.sampled_from(FIELD_NAMES), max_size=2)
    ),
    eval_fraction=st.sampled_from([0.0, 0.0, 0.5, 0.9]),
)
def test_any_data_file_loads_or_gives_a_sftlab_error(
    tmp_path_factory, file, task_format, columns, eval_fraction
):
    suffix, content = file
    task, fmt = task_format
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    cfg = DataConfig(train=str(path), format=fmt, columns=columns, eval_fraction=eval_fraction, max_length=32)
    try:
        train, evald = load_data(cfg, _tokenizer(task), task)
    except SftlabError as e:
        assert str(e).strip(), "an error must say something"
        return
    assert train.examples, "a load that succeeds has examples"


# -- config files and overrides ------------------------------------------------------------------------------

KEYS = {
    "model": ["name", "task", "dtype", "trust_remote_code", "attn_implementation"],
    "method": ["name", "r", "alpha", "target_modules", "dropout", "variant", "num_virtual_tokens", "per_task"],
    "data": ["train", "eval", "format", "max_length", "eval_fraction", "columns", "label_names", "limit", "tasks"],
    "train": [
        "output_dir", "max_steps", "epochs", "batch_size", "lr", "betas", "max_grad_norm", "seed",
        "warmup_steps", "eval_every", "save_every", "keep_last", "threads",
    ],
    "perf": ["packing", "loss_chunk_size", "micro_batch_tokens", "fused_loss"],
}  # fmt: skip
yaml_scalars = st.one_of(
    scalars.filter(lambda v: not isinstance(v, str) or "\x00" not in v),
    st.sampled_from(
        ["lora", "full", "tiny-llama", "causal-lm", "seq-cls", "1e-4", "-1", "", "~", "yes", "nan"]
    ),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def config_trees(draw):
    tree = {}
    for section in draw(st.lists(st.sampled_from([*KEYS, "bogus"]), max_size=5, unique=True)):
        keys = KEYS.get(section, ["x"])
        if draw(st.booleans()):
            tree[section] = draw(yaml_values)
        else:
            tree[section] = draw(
                st.dictionaries(st.sampled_from(keys + ["unknown_key"]), yaml_values, max_size=4)
            )
    return tree


@given(tree=config_trees(), overrides=st.lists(st.text(alphabet=string.printable, max_size=30), max_size=3))
def test_any_config_loads_or_gives_a_config_error(tmp_path_factory, tree, overrides):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        load_config(path, overrides)
    except SftlabError as e:
        assert str(e).strip()


@given(text=st.text(max_size=300))
def test_any_yaml_text_loads_or_gives_a_config_error(tmp_path_factory, text):
    base = "model:\n  name: tiny-llama\ndata:\n  train: x.jsonl\n"
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(base + text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except SftlabError as e:
        assert str(e).strip()


# -- failed commands leave an existing run as it was -----------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from sftlab.config import save_config
    from sftlab.recipe import train

    tmp = tmp_path_factory.mktemp("good")
    cfg = make_config(
        tmp, train={"max_steps": 2, "save_every": 1, "eval_every": 1}, data={"eval_fraction": 0.25}
    )
    assert train(cfg, log=lambda *_: None)["status"] == "completed"
    save_config(cfg, tmp / "user.yaml")
    return tmp, Path(cfg.train.output_dir)


@st.composite
def failing_commands(draw, tmp: Path, run: Path):
    """argv lists that must fail against the good run: bad data, bad values, bad targets."""
    kind = draw(st.sampled_from(["train-data", "train-value", "eval", "generate", "merge"]))
    cfg = str(tmp / "user.yaml")
    if kind == "train-data":
        suffix, content = draw(data_files())
        bad = tmp / f"bad-{draw(st.integers(0, 10**9))}{suffix}"
        bad.write_bytes(content)
        mode = draw(st.sampled_from(["--overwrite", "--resume"]))
        # an empty file and a file of a single valid record may train; such inputs are not "failing" by construction
        return [
            "train",
            cfg,
            f"data.train={bad}",
            "data.eval_fraction=0",
            "train.max_steps=3",
            "data.format=messages",
            mode,
        ]
    if kind == "train-value":
        key, value = draw(
            st.sampled_from(
                [
                    ("train.max_grad_norm", "-1"), ("train.lr", "-1"), ("train.batch_size", "0"),
                    ("train.betas", "[1.5, 0.9]"), ("model.task", "nope"), ("method.name", "lorra"),
                    ("data.max_length", "0"), ("train.keep_last", "0"), ("model.name", "no/such-model-xyz"),
                    ("train.output_dir", "''"), ("data.format", "seq2seq"),
                    ("method.name", "lora"), ("model.name", "tiny-gpt2"),  # the checkpoint does not fit: --resume only
                ]
            )
        )  # fmt: skip
        modes = (
            ["--resume"]
            if key in ("method.name", "model.name") and value in ("lora", "tiny-gpt2")
            else ["--overwrite", "--resume"]
        )
        return ["train", cfg, f"{key}={value}", draw(st.sampled_from(modes))]
    if kind == "eval":
        bad = draw(
            st.sampled_from(
                [["--batch-size", "0"], ["--data", str(tmp / "missing.jsonl")], ["--batch-size", "-3"]]
            )
        )
        return ["eval", str(run), *bad]
    if kind == "generate":
        bad = draw(
            st.sampled_from([["--temperature", "-1"], ["--max-new-tokens", "0"], ["--max-new-tokens", "-5"]])
        )
        return ["generate", str(run), "hi", *bad]
    out = draw(st.sampled_from([run / "final", run, run / "config.yaml", run / "checkpoints"]))
    return ["merge", str(run), str(out)]


@settings(max_examples=max(25, settings.default.max_examples // 4))  # a run per example: fewer
@given(data=st.data())
def test_a_failed_command_leaves_the_run_byte_identical(good_run, data, capsys):
    tmp, run = good_run
    before = file_tree(run)
    argv = data.draw(failing_commands(tmp, run))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects a bad option value with exit 2
        rc = e.code
    capsys.readouterr()
    fuzzed_data = argv[0] == "train" and argv[2].startswith("data.train=")
    if fuzzed_data and rc == 0:
        return  # the mutated file happened to be valid data: the run was legitimately replaced or continued
    assert rc != 0, f"{argv} should have failed"
    assert file_tree(run) == before, f"{argv} changed the run directory"

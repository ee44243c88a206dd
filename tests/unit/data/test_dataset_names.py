"""Datasets by name (issue 22 item 3): `hf:ORG/NAME[:split]` (+ data.subset) read through datasets.load_dataset from a
local cache built here (offline), and `datasets.yaml` registry names resolved when a config loads."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import make_config

from sftlab.config import build_config, load_config
from sftlab.data import load_data, read_records
from sftlab.errors import DataError
from sftlab.models import build_tiny
from sftlab.recipe import train

TRAIN = {"sentence": ["a good film", "a bad film", "great fun", "awful mess"], "label": [1, 0, 1, 0]}
VALID = {"sentence": ["fine work", "poor work"], "label": [1, 0]}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A datasets cache holding `someorg/tiny_sst` (subset sst2; splits train, validation; label a ClassLabel) laid out
    as a Hub download leaves it: <cache>/someorg___tiny_sst/sst2/0.0.0/<hash>/. Offline, datasets finds it there."""
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    for split, cols in (("train", TRAIN), ("validation", VALID)):
        pq.write_table(pa.table(cols), src / f"{split}.parquet")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    files = DataFilesDict.from_patterns(
        {"train": ["train.parquet"], "validation": ["validation.parquet"]}, base_path=str(src)
    )
    builder = Parquet(
        cache_dir=str(cache), dataset_name="tiny_sst", config_name="sst2", data_files=files, features=features,
        hash="0123abcd",
    )  # fmt: skip
    builder.download_and_prepare()
    # a Hub download's layout: the repo's namespace in the folder name, the config's plain name below it
    (cache / "tiny_sst").rename(cache / "someorg___tiny_sst")
    (config_dir,) = (cache / "someorg___tiny_sst").iterdir()
    config_dir.rename(cache / "someorg___tiny_sst" / "sst2")
    return cache


def test_hf_names_read_a_local_cache_offline_with_class_names(hub_cache):
    recs = read_records("hf:someorg/tiny_sst", subset="sst2")
    assert [r.fields for r in recs] == [
        {"sentence": s, "label": ["negative", "positive"][y]}
        for s, y in zip(TRAIN["sentence"], TRAIN["label"])
    ]
    assert recs[0].where == "hf:someorg/tiny_sst:1"
    val = read_records("hf:someorg/tiny_sst:validation", {"text": "sentence"}, subset="sst2")
    assert [r.fields["text"] for r in val] == VALID["sentence"]
    assert len(read_records("hf:someorg/tiny_sst:train", limit=3, subset="sst2")) == 3


def test_hf_errors_name_the_cache_the_split_and_the_subset(hub_cache):
    with pytest.raises(DataError, match=f"not in the local datasets cache \\({hub_cache}\\)"):
        read_records("hf:someorg/not_there")
    with pytest.raises(DataError, match="no split 'test'.*validation"):
        read_records("hf:someorg/tiny_sst:test", subset="sst2")
    with pytest.raises(DataError, match="data.subset:.*sst2"):
        read_records("hf:someorg/tiny_sst", subset="nope")
    with pytest.raises(DataError, match="expected hf:ORG/NAME"):
        read_records("hf:a/b/c")


def test_a_run_trains_and_evaluates_on_an_hf_dataset(hub_cache, tmp_path):
    cfg = make_config(
        tmp_path, "tiny-bert", "seq-cls", method={"name": "lora", "r": 4},
        data={"train": "hf:someorg/tiny_sst", "eval": "hf:someorg/tiny_sst:validation", "subset": "sst2",
              "columns": {"text": "sentence"}},
        train={"max_steps": 2, "eval_every": 2},
    )  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    assert summary["status"] == "completed" and summary["data"]["examples"] == 4
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["train"] == "hf:someorg/tiny_sst" and saved["subset"] == "sst2"
    # data.subset is left out of a config that does not set it (configs save as before)
    assert "subset" not in yaml.safe_load(make_config(tmp_path / "x").model_dump_json())["data"]


def _registry(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datasets.yaml").write_text(yaml.safe_dump(entries))


def _config_file(folder, data):
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-bert", "task": "seq-cls"}, "data": data}))
    return path


def test_registry_names_resolve_beside_the_config_then_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "proj" / "sst").mkdir(parents=True)
    (tmp_path / "proj" / "sst" / "train.tsv").write_text("sentence\tlabel\nnice\tpos\nbad\tneg\n")
    _registry(tmp_path / "proj", {"my_sst2": {"file": "sst/train.tsv", "format": "classification",
                                              "columns": {"text": "sentence"}}})  # fmt: skip
    _registry(
        tmp_path / "cwd", {"my_sst2": {"file": "elsewhere.tsv"}, "other": {"hf": "org/x", "split": "dev"}}
    )
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = load_config(_config_file(tmp_path / "proj", {"train": "my_sst2", "eval": "other"}))
    assert os.path.samefile(
        cfg.data.train, tmp_path / "proj" / "sst" / "train.tsv"
    )  # beside the config first
    assert cfg.data.format == "classification" and cfg.data.columns == {"text": "sentence"}
    assert cfg.data.eval == "hf:org/x:dev"  # found in the working directory's registry
    tok = build_tiny("tiny-bert", "seq-cls")[1]
    data, _ = load_data(cfg.data.model_copy(update={"eval": None}), tok, "seq-cls")
    assert data.label_names == ["neg", "pos"] and len(data.examples) == 2
    # a key the config sets itself wins over the registry's; overrides name registry entries too
    cfg = load_config(_config_file(tmp_path / "proj", {"train": "my_sst2", "columns": {"text": "label"}}))
    assert cfg.data.columns == {"text": "label"}
    cfg = load_config(None, ["model.name=tiny-bert", "model.task=seq-cls", "data.train=other"])
    assert cfg.data.train == "hf:org/x:dev"


def test_unknown_names_list_the_known_ones_and_bad_entries_name_the_key(tmp_path, monkeypatch):
    _registry(tmp_path, {"my_sst2": {"file": "a.tsv"}, "agnews": {"hf": "org/ag"}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.train: 'my_sst' is neither a file nor a dataset name in "
                                         r"datasets.yaml; known names: agnews, my_sst2"):  # fmt: skip
        load_config(None, ["model.name=tiny-bert", "data.train=my_sst"])
    _registry(tmp_path, {"x": {"file": "a.tsv", "formatt": "alpaca"}})
    with pytest.raises(DataError, match="datasets.yaml: x: formatt: unknown key; expected one of file, hf"):
        load_config(None, ["model.name=tiny-bert", "data.train=x"])
    _registry(tmp_path, {"x": {"file": "a.tsv", "hf": "o/n"}})
    with pytest.raises(DataError, match="x: expected exactly one of file"):
        load_config(None, ["model.name=tiny-bert", "data.train=x"])


def test_paths_are_never_looked_up(tmp_path, monkeypatch):
    _registry(tmp_path, {"train.jsonl": {"file": "other.jsonl"}, "data": {"file": "other.jsonl"}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    raw = {"model": {"name": "tiny-llama"}, "data": {"train": "train.jsonl"}}
    assert build_config(raw).data.train == "train.jsonl"  # has a suffix: a path, even when missing
    assert load_config(None, ["model.name=tiny-llama", "data.train=data"]).data.train == "data"  # exists

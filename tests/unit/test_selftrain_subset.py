"""Self-training reads an `hf:` dataset in `data.subset` (its configuration), as training does (data.load_data):
the labelled rows, the dev rows and the unlabelled pool; and the pre-flight check accepts `hf:` names."""

from sftlab.config import build_config
from sftlab.data import RawRecord, readers
from sftlab.selftrain import SelfTrainConfig, SelfTraining, check
from sftlab.selftrain.rows import labelled_and_dev, read_pool


def fake_hub(monkeypatch) -> list[tuple]:
    """A Hub whose datasets hold, per configuration, rows naming it (no network); the calls it got."""
    calls = []

    def read(spec, subset, limit):
        calls.append((spec, subset))
        split = spec.rpartition(":")[2]
        n = limit if limit is not None else 12
        for i in range(n):
            yield RawRecord(f"{spec}:{i}", {"text": f"{subset} {split} {i}", "label": "A" if i % 2 else "B"})

    monkeypatch.setattr(readers, "_read_hub", read)
    return calls


def job_for(tmp_path, data: dict) -> SelfTraining:
    raw = {
        "model": {"name": "tiny-bert", "task": "seq-cls"},
        "data": {"format": "classification", "subset": "sst2", **data},
        "train": {"output_dir": str(tmp_path / "st")},
    }
    st = SelfTrainConfig(unlabelled="hf:org/glue:test", skip=2, limit=3)
    return SelfTraining(build_config(raw, "t.yaml"), st, "t.yaml")


def test_self_training_reads_the_labelled_dev_and_pool_rows_in_data_subset(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch)
    job = job_for(tmp_path, {"train": "hf:org/glue:train", "eval": "hf:org/glue:validation"})
    check(job)  # hf: names are not files: not refused as missing
    train, dev = labelled_and_dev(job.cfg.data, job.cfg.train.seed)
    pool = read_pool(job.st.unlabelled, job.cfg.data, job.st.skip, job.st.limit)
    assert [r.fields["text"] for r in train[:2]] == ["sst2 train 0", "sst2 train 1"]
    assert dev[0].fields["text"] == "sst2 validation 0"
    assert [r.fields["text"] for r in pool] == ["sst2 test 2", "sst2 test 3", "sst2 test 4"]
    assert {subset for _, subset in calls} == {"sst2"}

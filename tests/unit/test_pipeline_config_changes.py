"""A pipeline stage or self-training run dir holds "a run of another config" only when a setting really changed: a
config key added to sftlab since the run was saved (at its default) is no change, or every new key would stop every
existing pipeline (seen: model.double_quant)."""

import yaml

from sftlab.config import build_config, save_config
from sftlab.rundir import config_changes


def test_a_key_added_since_the_run_was_saved_is_no_change_and_a_real_change_still_is(tmp_path):
    cfg = build_config({"model": {"name": "tiny-llama"}, "data": {"train": "x.txt"},
                        "train": {"objective": "clm", "output_dir": str(tmp_path / "run")}})  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["attn_implementation"]  # as a run saved before the key existed
    del saved["model"]["dtype"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(run, cfg) == []
    other = build_config({"model": {"name": "tiny-llama", "attn_implementation": "eager"}, "data": {"train": "x.txt"},
                          "train": {"objective": "clm", "output_dir": str(tmp_path / "run")}})  # fmt: skip
    assert config_changes(run, other) == [("model.attn_implementation", "sdpa", "eager")]

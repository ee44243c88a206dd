from pathlib import Path

import pytest

from sftlab.config import ConfigError, load_config, parse_overrides

CANONICAL = """\
model:
  name: tiny-llama          # HF id | local dir | path/to/file.gguf | built-in: tiny-llama, tiny-gpt2, tiny-bert, tiny-t5
  task: causal-lm           # causal-lm | seq-cls | seq2seq
  dtype: float32            # float32 | bfloat16
method:
  name: full                # full | freeze | lora | adapter | prefix | ptuning | prompt
data:
  train: data/train.jsonl   # json, jsonl, csv, tsv, parquet, or a directory of them
  eval: data/eval.jsonl     # optional; or eval_fraction: 0.05
  format: alpaca            # text | alpaca | messages | sharegpt | classification | seq2seq
  max_length: 512
train:
  output_dir: runs/demo
  max_steps: 100            # or epochs
  batch_size: 8
  grad_accum: 1
  lr: 2.0e-4
  schedule: cosine          # cosine | linear | constant, with warmup_steps
  warmup_steps: 10
  eval_every: 50
  save_every: 50
  seed: 0
"""


@pytest.fixture
def canonical(tmp_path) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(CANONICAL)
    return p


def test_canonical_config_loads(canonical):
    cfg = load_config(canonical)
    assert cfg.model.name == "tiny-llama" and cfg.method.name == "full"
    assert cfg.train.lr == 2.0e-4 and cfg.train.max_steps == 100 and cfg.data.format == "alpaca"


def test_overrides_are_parsed_as_yaml(canonical):
    cfg = load_config(
        canonical,
        [
            "train.lr=1e-4",
            "method.name=freeze",
            "method.trainable_modules=[q_proj,v_proj]",
            "train.gradient_checkpointing=true",
            "train.max_grad_norm=null",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method.trainable_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True and cfg.train.max_grad_norm is None
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


def test_unknown_key_suggests(canonical):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(canonical, ["train.lrr=1"])
    with pytest.raises(
        ConfigError, match=r"method\.trainable_layer: unknown key \(did you mean 'trainable_layers'"
    ):
        load_config(canonical, ["method.name=freeze", "method.trainable_layer=1"])


def test_bad_values_name_key_value_and_allowed(canonical):
    with pytest.raises(
        ConfigError,
        match=r"train\.schedule: 'cosin' is not allowed; expected 'cosine', 'linear' or 'constant'",
    ):
        load_config(canonical, ["train.schedule=cosin"])
    with pytest.raises(
        ConfigError, match=r"method\.name: 'lroa' is not one of full, freeze, lora.*did you mean 'lora'"
    ):
        load_config(canonical, ["method.name=lroa"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*greater than 0 \(got -1\)"):
        load_config(canonical, ["train.batch_size=-1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(canonical, ["train.lr"])


def test_resolved_config_round_trips(canonical, tmp_path):
    from sftlab.config import save_config

    cfg = load_config(canonical, ["train.lr=3e-4"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 7, f"expected the shipped configs under {root}, found {len(files)}"
    for f in files:
        cfg = load_config(f)
        assert cfg.method.name == f.stem, f"{f}: configs are named <model>/<method>.yaml"
        rel = f.relative_to(root.parent).as_posix()
        header = f.read_text().splitlines()[0]
        assert header.startswith(f"# sftlab train {rel}"), f"{f}: first line must be the command that runs it"


def test_speed_levers_live_in_perf_and_old_keys_name_their_new_place(tmp_path):
    cfg = load_config(None, ["model.name=tiny-llama", "data.train=x.jsonl", "perf.fused_loss=false"])
    assert cfg.perf.fused_loss is False and cfg.perf.onednn_gemm is True
    with pytest.raises(ConfigError, match=r"train\.fused_loss moved to perf\.fused_loss"):
        load_config(None, ["model.name=tiny-llama", "data.train=x.jsonl", "train.fused_loss=false"])
    old = tmp_path / "config.yaml"  # a run directory written before perf: existed
    old.write_text(
        "model: {name: tiny-llama}\ndata: {train: x.jsonl}\ntrain: {micro_batch_tokens: 64, lr: 0.01}\n"
    )
    with pytest.raises(ConfigError, match="train.micro_batch_tokens moved to perf.micro_batch_tokens"):
        load_config(old)
    migrated = load_config(old, migrate=True)
    assert migrated.perf.micro_batch_tokens == 64 and migrated.train.lr == 0.01

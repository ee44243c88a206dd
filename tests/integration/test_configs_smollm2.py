"""configs/smollm2-135m/*.yaml: they read the quickstart's data, the LoRA one is the quickstart's recipe, every
method section trains (on tiny-llama here; on the real model in the slow test), and the model alias resolves."""

from pathlib import Path

import pytest

from sftlab.cli.main import main
from sftlab.config import load_config
from sftlab.demo_model import DEMO_DIRNAME, cache_root, is_complete
from sftlab.hub import DEMO_MODEL, resolve_alias
from sftlab.quickstart.pipeline import DEFAULT_LORA, DEFAULT_TRAIN, QuickstartOptions, build_run_config
from sftlab.quickstart.task import make_splits, write_jsonl
from sftlab.runs import load_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "smollm2-135m").glob("*.yaml"))


def test_one_config_per_method():
    assert {p.stem for p in CONFIGS} == {"lora", "full", "adapter", "prefix", "prompt", "ptuning"}
    for p in CONFIGS:
        assert load_config(p).method.name == p.stem
        assert p.read_text().startswith(f"# sftlab train configs/smollm2-135m/{p.name}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_reads_the_quickstart_data(path):
    cfg = load_config(path)
    qs = build_run_config(DEMO_MODEL, Path(QuickstartOptions().output_dir), QuickstartOptions())
    assert cfg.model.name == DEMO_MODEL == qs.model.name
    assert cfg.data.train == qs.data.train == "runs/quickstart/data/train.jsonl"
    assert cfg.data.eval == "runs/quickstart/data/eval.jsonl"
    assert cfg.data.format == qs.data.format and cfg.data.template == qs.data.template


def test_lora_config_is_the_quickstart_recipe():
    cfg = load_config(ROOT / "configs" / "smollm2-135m" / "lora.yaml")
    for k, v in DEFAULT_LORA.items():
        assert getattr(cfg.method, k) == v, k
    for k, v in DEFAULT_TRAIN.items():
        assert getattr(cfg.train, k) == v, k


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qsdata")
    train, held = make_splits(6, 2)
    write_jsonl(train, d / "train.jsonl")
    write_jsonl(held, d / "eval.jsonl")
    return d


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_on_tiny_llama(path, quickstart_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(path), "model.name=tiny-llama", f"data.train={quickstart_data / 'train.jsonl'}",
               f"data.eval={quickstart_data / 'eval.jsonl'}", f"train.output_dir={out}", "train.max_steps=2",
               "train.batch_size=3", "train.warmup_steps=0", "train.progress=false", "train.threads=1"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    model, _, cfg = load_run(out)
    assert cfg.method.name == path.stem and cfg.train.max_steps == 2


def test_demo_alias_resolves_through_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    target = cache / DEMO_DIRNAME
    target.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / f).write_text("{}")
    monkeypatch.setenv("SFTLAB_CACHE", str(cache))
    assert resolve_alias(DEMO_MODEL) == str(target)
    assert resolve_alias("tiny-llama") == "tiny-llama"
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEMO_MODEL).mkdir()  # a local directory of that name wins over the alias
    assert resolve_alias(DEMO_MODEL) == DEMO_MODEL


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_the_real_model(path, quickstart_data, tmp_path):
    if not is_complete(cache_root() / DEMO_DIRNAME):
        pytest.skip("SmolLM2-135M-Instruct is not cached (run `sftlab quickstart` once)")
    out = tmp_path / "run"
    rc = main(["train", str(path), f"data.train={quickstart_data / 'train.jsonl'}",
               f"data.eval={quickstart_data / 'eval.jsonl'}", f"train.output_dir={out}", "train.max_steps=2",
               "train.batch_size=2", "train.progress=false"])  # fmt: skip
    assert rc == 0
    model, tok, cfg = load_run(out)
    assert cfg.model.name == DEMO_MODEL and tok.eos_token == "<|im_end|>"

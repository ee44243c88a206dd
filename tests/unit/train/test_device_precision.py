"""train.device and train.precision (train/device.py): devices resolve or fail by name, the mixed modes keep the
trainable parameters and the optimizer state fp32 and track fp32's loss, pure bf16 is full fine-tuning only."""

import math
import warnings

import pytest
import torch
from helpers import make_config

from sftlab import models
from sftlab.errors import ConfigError
from sftlab.recipe import prepare, train
from sftlab.train.device import Precision, resolve_device
from sftlab.train.loop import Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = dict(log=lambda *_: None)


def _trainer(cfg):
    model, _, data, _ = prepare(cfg, **QUIET)
    return Trainer(
        model=model,
        cfg=cfg.train,
        task=cfg.model.task,
        train_examples=data.examples,
        pad_id=0,
        run_dir=__import__("pathlib").Path(cfg.train.output_dir),
        perf=cfg.perf,
        callbacks=[],
        **QUIET,
    )


def _losses(cfg, steps):
    t = _trainer(cfg)
    t.objective.train()
    return t, [t.step().loss for _ in range(steps)]


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "cuda0"])
def test_bad_device_names_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match="train.device"):
        make_config(tmp_path, train={"device": bad})


def test_auto_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"train.device: '{name}'.*no CUDA device"):
        resolve_device(name)


def test_fp16_mixed_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16-mixed needs a CUDA device"):
        Precision("fp16-mixed", torch.device("cpu"))


def test_pure_bf16_is_full_fine_tuning_only(tmp_path):
    with pytest.raises(ConfigError, match="train.precision: bf16 .* method.name: full; with lora"):
        make_config(tmp_path, method={"name": "lora"}, train={"precision": "bf16"})


def test_bf16_mixed_warns_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="train.precision=bf16-mixed on a CPU without native bf16"):
        Precision("bf16-mixed", torch.device("cpu"))
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Precision("bf16-mixed", torch.device("cpu"))


def test_mixed_precision_turns_the_fp32_only_levers_off():
    from sftlab.config import PerfConfig

    perf = PerfConfig()
    assert Precision("fp32", torch.device("cpu")).perf(perf) is perf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not Precision("bf16-mixed", torch.device("cpu")).perf(perf).onednn_gemm


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_mixed_tracks_fp32_and_keeps_fp32_state(tmp_path, method):
    """30 steps on tiny-llama: bf16-mixed's loss curve within bf16 rounding of fp32's; every trainable parameter and
    every optimizer state tensor stays fp32 (the master weights)."""
    common = dict(
        n=48,
        method={"name": method},
        train={"max_steps": 30, "batch_size": 8, "lr": 2e-2 if method == "lora" else 1e-3},
    )
    _, ref = _losses(make_config(tmp_path / "a", **common), 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = make_config(
            tmp_path / "b", **{**common, "train": {**common["train"], "precision": "bf16-mixed"}}
        )
        t, got = _losses(cfg, 30)
    assert got != ref  # bf16 really ran (a no-op autocast would give fp32's losses bit for bit)
    assert ref[-1] < ref[0] - 0.3 and got[-1] < got[0] - 0.3  # it learns
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=0.02, abs=0.02)
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    states = [
        v for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1
    ]
    assert states and all(v.dtype == torch.float32 for v in states)


def test_bf16_mixed_runs_under_autocast(tmp_path, monkeypatch):
    """The forward sees autocast on (bf16), evaluation too; fp32 sees it off."""
    seen = []
    from sftlab.train import objective

    real = objective.Objective.forward

    def spy(self, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(self, batch)

    monkeypatch.setattr(objective.Objective, "forward", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = _trainer(make_config(tmp_path, train={"precision": "bf16-mixed", "batch_size": 4}))
    t.step()
    t.eval_examples = t.train_examples[:4]
    t.run_eval()
    assert seen and all(s == torch.bfloat16 for s in seen)
    seen.clear()
    _trainer(make_config(tmp_path / "fp32")).step()
    assert seen and not any(seen)


def test_pure_bf16_trains_in_bf16(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = make_config(tmp_path, n=48, train={"precision": "bf16", "max_steps": 15, "batch_size": 8})
        t, losses = _losses(cfg, 15)
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    states = [
        v for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1
    ]
    assert states and all(v.dtype == torch.bfloat16 for v in states)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_trains_on_cuda_and_resumes_on_cpu(tmp_path, precision):
    """Model, batches and optimizer state on the GPU; the checkpoint it writes resumes on the CPU."""
    cfg = make_config(
        tmp_path,
        method={"name": "lora"},
        train={"device": "cuda", "precision": precision, "max_steps": 4, "save_every": 2},
    )
    t = _trainer(cfg)
    assert all(p.device.type == "cuda" for p in t.model.parameters())
    t.objective.train()
    for _ in range(2):
        t.step()
    t.save()
    assert all(v.device.type == "cuda" for st in t.optimizer.state.values() for v in st.values() if v.dim())
    cfg_cpu = cfg.model_copy(deep=True)
    cfg_cpu.train.device = "cpu"
    cfg_cpu.train.precision = "fp32"
    c = _trainer(cfg_cpu)
    assert c.resume() and c.state.step == 2
    for (n, p), q in zip(t.model.named_parameters(), c.model.parameters()):
        if p.requires_grad:
            assert torch.equal(p.detach().cpu(), q.detach()), n


@cuda
def test_train_on_cuda_end_to_end(tmp_path):
    summary = train(make_config(tmp_path, method={"name": "lora"}, train={"device": "cuda", "max_steps": 3}))
    assert summary["status"] == "completed"


def test_a_run_is_usable_where_its_device_is_missing():
    """eval/generate/merge load a run onto the device it trained on when this machine has it, else the CPU."""
    from sftlab.train.device import usable_device

    assert usable_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert usable_device("cuda:3") == torch.device("cpu")
        with pytest.raises(ConfigError):
            resolve_device("cuda:3")  # training there is an error; using its result is not

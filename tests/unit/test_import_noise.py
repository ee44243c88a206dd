"""torchao's import-time messages (transformers imports torchao when it is installed) no longer print on every
`sftlab` command: its optional-kernel load failures go to DEBUG, torch's Enum-constant deprecation note is dropped;
any other message of those loggers passes unchanged (cli/main.py `_quiet_torchao_import`)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sftlab.cli.main import _quiet_torchao_import

SO = "/venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"


def test_torchao_kernel_load_failures_go_to_debug_and_other_warnings_stay(caplog):
    _quiet_torchao_import()
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("torchao")
    log.warning(f"Failed to load {SO}: Could not load this library: {SO}")
    log.warning("Failed to load the quantization config: bad key")  # not a kernel .so: a real warning
    log.warning("Skipping import of cpp extensions due to incompatible torch version")
    pytree = logging.getLogger("torch.utils._pytree")
    pytree.warning(
        "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
        "opaque value type. Calling register_constant() on Enum subclasses is deprecated"
    )
    pytree.warning("some other pytree warning")
    got = [(r.name, r.levelname, r.getMessage()[:30]) for r in caplog.records]
    assert got == [
        ("torchao", "DEBUG", f"Failed to load {SO}"[:30]),
        ("torchao", "WARNING", "Failed to load the quantizatio"),
        ("torchao", "WARNING", "Skipping import of cpp extensi"),
        ("torch.utils._pytree", "WARNING", "some other pytree warning"),
    ]


def test_a_command_prints_no_torchao_noise():
    pytest.importorskip("torchao")
    # A command that imports the libraries (transformers, so torchao) and then stops on a missing run directory.
    code = "from sftlab.cli.main import main; raise SystemExit(main(['eval', '/no/such/run']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
    assert "Failed to load" not in res.stderr and "Enum subclass" not in res.stderr, res.stderr

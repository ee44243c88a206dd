"""`sftlab ui`: binds to this machine only unless told otherwise; without gradio, one error line."""

from __future__ import annotations

import sys

from sftlab.cli.main import build_parser, main


def test_defaults_bind_localhost():
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.runs, args.state_dir) == ("127.0.0.1", 7860, "runs", ".sftlab-ui")


def test_without_gradio_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["ui", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "error: sftlab ui needs gradio, which is not installed: pip install 'sftlab[ui]' (or pip install gradio)\n"
    )

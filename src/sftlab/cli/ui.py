"""sftlab ui [--host 127.0.0.1] [--port 7860]: the web UI (Gradio, the `ui` extra)."""

from __future__ import annotations

import argparse

from ._args import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="Web UI: train, watch, compare, chat, export (needs the `ui` extra: pip install 'sftlab[ui]').",
        description="Serve a page that starts `sftlab train` runs as subprocesses and watches their run "
        "directories, compares runs, chats with a trained run and merges it. Binds to 127.0.0.1 unless --host "
        "says otherwise: anyone who reaches the port can start processes as you.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--runs", default="runs", help="folder the Runs and Chat pages search for run dirs (default runs)"
    )
    p.add_argument(
        "--state-dir",
        default=".sftlab-ui",
        help="where the page keeps the configs it writes and the logs of the runs it starts (default .sftlab-ui)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import ConfigError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError(
            "sftlab ui needs gradio, which is not installed: pip install 'sftlab[ui]' (or pip install gradio)"
        ) from None
    from ..ui.app import build_app
    from ..ui.jobs import restore_ctrl_c

    restore_ctrl_c()
    app = build_app(runs_root=args.runs, state_dir=args.state_dir)
    print(
        f"sftlab ui: http://{args.host}:{args.port}  (Ctrl-C stops the page and the runs it started)",
        flush=True,
    )
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            ssr_mode=False,
            quiet=True,
            show_error=True,
        )
    finally:
        app.sftlab_manager.stop_all()
    return 0

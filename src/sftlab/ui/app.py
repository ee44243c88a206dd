"""`sftlab ui`'s page layout (Gradio): Train, Runs, Chat, Export. Layout and wiring only; what each button does
lives in jobs.py (processes), settings.py (the config the run gets), rundirs.py (what a run directory says) and
chat.py (the loaded model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import SftlabError
from . import jobs, rundirs, settings
from .chat import ChatModels

ERRORS = (SftlabError, ValueError, OSError)  # shown on the page as `error: ...`, as the CLI prints them
REFRESH_S = 1.5


def _err(e: BaseException) -> str:
    return f"error: {e}"


def _table(header: list[str], rows: list[list[Any]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=header)


def _signature(run: Path) -> tuple:
    """Changes whenever the run writes metrics or its summary: the curve is redrawn only then."""
    out = []
    for name in ("metrics.jsonl", "summary.json"):
        try:
            st = (run / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def build_app(runs_root: str = "runs", state_dir: str = ".sftlab-ui", cwd: str | None = None) -> gr.Blocks:
    """The page. `runs_root`: where the Runs and Chat pages look for run directories; `state_dir`: the configs the
    page writes and the logs of the runs it starts."""
    base = Path(cwd) if cwd else Path.cwd()
    manager = jobs.JobManager(base / state_dir, base)
    models = ChatModels()

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(base.resolve()))
        except ValueError:
            return str(p)

    def run_choices(root: str, trained_only: bool = False) -> list[str]:
        found = rundirs.find_runs(base / (root or "."))
        if trained_only:
            found = [r for r in found if (r / "final").is_dir()]
        return [rel(r) for r in found]

    with gr.Blocks(title="sftlab", analytics_enabled=False) as app:
        gr.Markdown("## sftlab: fine-tune, watch, compare, chat, export")
        with gr.Tab("Train", id="train"):
            with gr.Row():
                yaml_path = gr.Textbox(
                    label="start from a config YAML (optional)", elem_id="config-path", scale=4
                )
                load_btn = gr.Button("Load YAML", elem_id="load-yaml", scale=1)
            with gr.Row():
                model = gr.Textbox(label="model (HF id, local dir, .gguf, tiny-llama, smollm2-135m-instruct)",
                                   value="tiny-llama", elem_id="model")  # fmt: skip
                train_file = gr.Textbox(label="train data file", elem_id="train-file")
                eval_file = gr.Textbox(label="eval data file (optional)", elem_id="eval-file")
                fmt = gr.Dropdown(settings.FORMATS, value="alpaca", label="data format", elem_id="format")
            with gr.Row():
                method = gr.Dropdown(settings.METHODS, value="lora", label="method", elem_id="method")
                lr = gr.Number(value=2e-4, label="learning rate", elem_id="lr")
                steps = gr.Number(value=100, precision=0, label="max steps", elem_id="steps")
                batch = gr.Number(value=8, precision=0, label="batch size", elem_id="batch")
                rank = gr.Number(value=8, precision=0, label="LoRA rank", elem_id="rank")
                vtokens = gr.Number(
                    value=16, precision=0, label="virtual tokens (prefix/prompt)", elem_id="vtokens"
                )
            with gr.Row():
                output_dir = gr.Textbox(value="runs/ui", label="output dir", elem_id="output-dir")
                eval_every = gr.Number(
                    value=None, precision=0, label="eval every (steps; 0: the config's)", elem_id="eval-every"
                )
                save_every = gr.Number(
                    value=None, precision=0, label="save every (steps; 0: the config's)", elem_id="save-every"
                )
                extra = gr.Textbox(label="extra overrides, key=value per line", lines=2, elem_id="extra")
            form_fields = [model, train_file, eval_file, fmt, method, lr, steps, batch, rank, vtokens, output_dir,
                           eval_every, save_every]  # fmt: skip
            with gr.Row():
                estimate_btn = gr.Button("Estimate (sftlab plan)", elem_id="estimate")
                overwrite = gr.Checkbox(label="replace an existing run (--overwrite)", elem_id="overwrite")
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                resume_btn = gr.Button("Resume", elem_id="resume")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            command = gr.Textbox(label="command", interactive=False, elem_id="command")
            with gr.Accordion("planner estimate", open=False) as plan_box:
                plan_text = gr.Textbox(label="choice and recommendation", lines=4, interactive=False,
                                       elem_id="plan-text")  # fmt: skip
                plan_rows = gr.Dataframe(
                    headers=settings.PLAN_COLUMNS, interactive=False, elem_id="plan-table"
                )
            status = gr.Textbox(label="status", interactive=False, elem_id="status")
            with gr.Row():
                curve = gr.Plot(label="loss", elem_id="curve", format="png")
                summary = gr.JSON(label="summary.json", elem_id="summary")
            log = gr.Textbox(
                label="log", lines=12, max_lines=12, interactive=False, autoscroll=True, elem_id="log"
            )
            watched = gr.State("")  # the run directory this page started or resumed last
            drawn = gr.State(None)  # its files' signature when the curve was last drawn
            timer = gr.Timer(REFRESH_S)

        def load_yaml(path: str):
            try:
                form = settings.form_from_config(path.strip())
            except ERRORS as e:
                return [gr.skip()] * len(form_fields) + [_err(e)]
            return form.values() + [f"loaded {path}"]

        load_btn.click(load_yaml, [yaml_path], form_fields + [status])

        def estimate(*values):
            try:
                rows, text = settings.plan_estimate(settings.TrainForm(*values))
            except ERRORS as e:
                return gr.skip(), _err(e), gr.Accordion(open=True)
            return _table(settings.PLAN_COLUMNS, rows), text, gr.Accordion(open=True)

        estimate_btn.click(estimate, form_fields, [plan_rows, plan_text, plan_box])

        def launch(mode: str, path: str, extra_text: str, replace: bool, *values):
            form = settings.TrainForm(*values)
            if mode == "start" and replace:
                mode = "overwrite"
            try:
                base_raw = settings.read_yaml(path.strip()) if path.strip() else None
                overrides = settings.parse_extra(extra_text or "")
                raw = settings.raw_config(form, base_raw)
                cfg_path = settings.config_path(manager.state_dir, form.output_dir)
                cfg = settings.write_config(raw, cfg_path, overrides)
                job = manager.start(rel(cfg_path), overrides, cfg.train.output_dir, mode)
            except ERRORS as e:
                return gr.skip(), _err(e), gr.skip(), None
            return jobs.shown(job.argv), f"{job.status}: {rel(job.output_dir)}", rel(job.output_dir), None

        start_inputs = [yaml_path, extra, overwrite, *form_fields]
        start_btn.click(lambda *a: launch("start", *a), start_inputs, [command, status, watched, drawn])
        resume_btn.click(lambda *a: launch("resume", *a), start_inputs, [command, status, watched, drawn])

        def stop(run: str, out: str):
            job = manager.get(run or out)
            if job is None or not job.running:
                return "no run in progress started from this page"
            return f"{job.stop()}: {rel(job.output_dir)}"

        stop_btn.click(stop, [watched, output_dir], [status])

        def refresh(run: str, last):
            if not run:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
            path = base / run
            job = manager.get(path)
            view = rundirs.load_view(path)
            state = view.status if job is None else job.describe(view)
            sig = _signature(path)
            fig = rundirs.curves_figure([view], base, title=run) if sig != last else gr.skip()
            text = job.log_text() if job is not None else ""
            return state, fig, view.summary if sig != last else gr.skip(), text, sig

        timer.tick(refresh, [watched, drawn], [status, curve, summary, log, drawn])

        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                root = gr.Textbox(value=runs_root, label="runs folder", elem_id="runs-root", scale=4)
                refresh_btn = gr.Button("Refresh", elem_id="runs-refresh", scale=1)
            runs_table = gr.Dataframe(
                headers=rundirs.SUMMARY_COLUMNS, interactive=False, elem_id="runs-table"
            )
            picked = gr.Dropdown([], multiselect=True, label="compare", elem_id="runs-pick")
            compare_curve = gr.Plot(label="loss curves", elem_id="runs-curve", format="png")
            eval_rows = gr.Dataframe(headers=["metric"], interactive=False, label="evaluation results",
                                     elem_id="runs-eval")  # fmt: skip

        def list_runs(folder: str, chosen: list[str] | None):
            names = run_choices(folder)
            views = [rundirs.load_view(base / n) for n in names]
            table = _table(rundirs.SUMMARY_COLUMNS, rundirs.summaries_table(views, base))
            keep = [c for c in (chosen or []) if c in names] or names[:2]
            return table, gr.Dropdown(choices=names, value=keep)

        def compare(chosen: list[str] | None):
            paths = [base / c for c in chosen or []]
            views = [rundirs.load_view(p) for p in paths]
            header, rows = rundirs.eval_table(paths, base)
            return rundirs.curves_figure(views, base, title="loss"), _table(header, rows)

        refresh_btn.click(list_runs, [root, picked], [runs_table, picked])
        picked.change(compare, [picked], [compare_curve, eval_rows])

        with gr.Tab("Chat", id="chat") as chat_tab:
            with gr.Row():
                chat_run = gr.Dropdown([], label="run", allow_custom_value=True, elem_id="chat-run", scale=4)
                chat_refresh = gr.Button("Refresh", elem_id="chat-refresh", scale=1)
                max_new = gr.Number(value=64, precision=0, label="max new tokens", elem_id="chat-max-new")
                temperature = gr.Number(
                    value=0.0, label="temperature (0 = greedy)", elem_id="chat-temperature"
                )
            chatbot = gr.Chatbot(
                label="chat (each message is one prompt, as `sftlab generate`)",
                elem_id="chatbot",
                render_markdown=False,  # model output as written: a `*` or `#` in a reply is text
            )
            with gr.Row():
                message = gr.Textbox(label="message", elem_id="chat-input", scale=5)
                send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)

        def trained_runs(folder: str, current: str):
            names = run_choices(folder, trained_only=True)
            return gr.Dropdown(
                choices=names, value=current if current in names else (names[0] if names else None)
            )

        def respond(run: str, text: str, history: list | None, n: float, temp: float):
            history = list(history or [])
            if not text.strip():
                return history, text
            try:
                if not run:
                    raise ValueError("pick a run with a trained model (Refresh lists them)")
                answer = models.reply(str(base / run), text, int(n or 64), float(temp or 0.0))
            except ERRORS as e:
                answer = _err(e)
            history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": answer or "(empty)"},
            ]
            return history, ""

        chat_refresh.click(trained_runs, [root, chat_run], [chat_run])
        chat_tab.select(trained_runs, [root, chat_run], [chat_run])  # a run trained since the page loaded
        for trigger in (send.click, message.submit):
            trigger(respond, [chat_run, message, chatbot, max_new, temperature], [chatbot, message])

        with gr.Tab("Export", id="export") as export_tab:
            gr.Markdown(
                "Merge a run's adapter into a plain Hugging Face model: `sftlab merge RUN_DIR OUT_DIR`."
            )
            with gr.Row():
                merge_run = gr.Dropdown([], label="run", allow_custom_value=True, elem_id="merge-run")
                merge_out = gr.Textbox(label="output dir", elem_id="merge-out")
                merge_force = gr.Checkbox(
                    label="replace a non-empty output dir (--force)", elem_id="merge-force"
                )
            merge_btn = gr.Button("Merge", variant="primary", elem_id="merge")
            merge_log = gr.Textbox(label="output", lines=6, interactive=False, elem_id="merge-log")

        def merge(run: str, out: str, force: bool):
            if not run or not out:
                return "error: give a run directory and an output directory"
            args = ["merge", run, out, *(["--force"] if force else [])]
            rc, text = jobs.run_command(args, cwd=base)
            return f"$ {jobs.shown([*jobs.CLI, *args])}\n{text}(exit {rc})"

        merge_btn.click(merge, [merge_run, merge_out, merge_force], [merge_log])
        export_tab.select(trained_runs, [root, merge_run], [merge_run])

        def on_load():
            trained = run_choices(runs_root, trained_only=True)
            first = trained[0] if trained else None
            return gr.Dropdown(choices=trained, value=first), gr.Dropdown(choices=trained, value=first)

        app.load(on_load, None, [chat_run, merge_run])
        app.load(list_runs, [root, picked], [runs_table, picked])
    app.sftlab_manager = manager  # `sftlab ui` stops the runs it started when it exits
    return app

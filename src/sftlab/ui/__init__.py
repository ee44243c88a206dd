"""`sftlab ui`: a web page over the CLI. Every action is the CLI's own code path: a training run is a `sftlab train`
subprocess writing an ordinary run directory, merge is `sftlab merge`, chat is generate.py on runs.load_run.

app.py       the page (Gradio): Train, Runs, Chat, Export tabs; layout and wiring only
jobs.py      run-process manager: start / stop (Ctrl-C, so a checkpoint is saved) / resume, logs
settings.py  the Train form <-> a config YAML, validated as `sftlab train` does; the planner's estimate
rundirs.py   run-directory reader: metrics, summaries, eval results, curves
chat.py      the loaded model a chat answers with

Only app.py imports gradio (the `ui` extra); the rest is tested without a browser.
"""

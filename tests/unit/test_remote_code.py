"""Remote code runs only when the user passes --trust-remote-code on that command line: a run directory saying
`trust_remote_code: true` (with an auto_map and .py files beside the weights) is ignored with a warning, a config
saying it without the flag is refused, and a string such as 'yes' is a type error, never true."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_config

from sftlab.cli.main import main
from sftlab.config import ConfigError, load_config
from sftlab.recipe import train

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    cfg = make_config(tmp, train={"max_steps": 1})
    train(cfg, **QUIET)
    return Path(cfg.train.output_dir)


def _poison(run: Path, marker: Path) -> None:
    """Make `run` a hostile download: config.yaml trusts remote code, final/config.json maps the auto classes to .py
    files in final/, and importing either file writes `marker`."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    final = run / "final"
    config = json.loads((final / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (final / "config.json").write_text(json.dumps(config))
    write = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (final / "configuration_evil.py").write_text(
        write + "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n"
    )
    (final / "modeling_evil.py").write_text(
        write
        + "from transformers import LlamaForCausalLM\n\n\nclass EvilModel(LlamaForCausalLM):\n    pass\n"
    )


@pytest.fixture
def hostile_run(tmp_path, trained_run, monkeypatch) -> tuple[Path, Path]:
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # not the user's cache
    run, marker = tmp_path / "downloaded-run", tmp_path / "code-ran"
    shutil.copytree(trained_run, run)
    _poison(run, marker)
    return run, marker


@pytest.mark.parametrize(
    "argv",
    [["eval", "{run}"], ["generate", "{run}", "hello", "--max-new-tokens", "2"], ["merge", "{run}", "{out}"]],
    ids=["eval", "generate", "merge"],
)
def test_a_run_dir_cannot_turn_on_remote_code(hostile_run, tmp_path, argv, capsys):
    run, marker = hostile_run
    args = [a.format(run=run, out=tmp_path / "merged") for a in argv]
    with pytest.warns(UserWarning, match=r"trust_remote_code: true ignored.*pass --trust-remote-code"):
        rc = main(args)
    assert not marker.exists(), "the run directory's code ran"
    # eval/generate work on the trained weights; a full run cannot be merged, which merge says after loading it
    assert rc == (2 if argv[0] == "merge" else 0), capsys.readouterr().err
    if argv[0] == "merge":
        assert "cannot be merged" in capsys.readouterr().err


def test_the_command_line_flag_does_run_it(hostile_run, recwarn):
    """The control: the same run dir with --trust-remote-code runs its code, so the test above can fail."""
    run, marker = hostile_run
    main(["generate", str(run), "hello", "--max-new-tokens", "2", "--trust-remote-code"])
    assert marker.read_text() == "ran"
    assert not [w for w in recwarn if "trust_remote_code" in str(w.message)]


def _yaml(tmp_path: Path, trust) -> Path:
    p = tmp_path / f"run-{trust}.yaml"
    p.write_text(
        yaml.safe_dump(
            {"model": {"name": "tiny-llama", "trust_remote_code": trust}, "data": {"train": "x.jsonl"}}
        )
    )
    return p


def test_train_needs_the_flag_for_remote_code(tmp_path, capsys):
    p = _yaml(tmp_path, True)
    with pytest.raises(
        ConfigError, match=r"run-True\.yaml: model\.trust_remote_code: true .*add --trust-remote-code"
    ):
        load_config(p)
    with pytest.raises(ConfigError, match="add --trust-remote-code"):
        load_config(_yaml(tmp_path, False), ["model.trust_remote_code=true"])  # an override is config too
    assert main(["train", str(p)]) == 2
    assert "add --trust-remote-code" in capsys.readouterr().err
    assert load_config(p, trust_remote_code=True).model.trust_remote_code is True
    assert load_config(_yaml(tmp_path, False), trust_remote_code=True).model.trust_remote_code is True
    assert load_config(_yaml(tmp_path, False)).model.trust_remote_code is False


@pytest.mark.parametrize("value", ["yes", "true", "True", 1, "1", "on"])
def test_trust_remote_code_takes_only_a_real_bool(tmp_path, value):
    with pytest.raises(
        ConfigError, match=rf"model\.trust_remote_code: must be true or false \(got {value!r}\)"
    ):
        load_config(_yaml(tmp_path, value), trust_remote_code=True)
    override = (
        f"model.trust_remote_code={value!r}" if isinstance(value, str) else f"model.trust_remote_code={value}"
    )
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: must be true or false"):
        load_config(_yaml(tmp_path, False), [override])

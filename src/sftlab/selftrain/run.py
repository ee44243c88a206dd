"""`sftlab self-train CONFIG`: a teacher labels the unlabelled pool, a student trains on labelled + pseudo-labelled
rows, and the student becomes the next round's teacher.

    SELF_DIR/                    (the config's train.output_dir)
      selftrain.yaml             the config (run config + self_train); a rerun must match it (rounds may change)
      selftrain.json             status, the teacher, and per round: counts per class, files, the student's result
      selftrain.png              dev metric and pseudo-label count per round
      summary.json               the last student's result (what a pipeline stage reports)
      dev.jsonl                  the dev rows as the config's runs read them (eval file, limit or eval_fraction split)
      00-teacher/                a run dir: the config trained on data.train alone (unless self_train.teacher)
      round-N/pseudo.jsonl       the kept pseudo-labelled rows, each with its confidence, round and pool index
      round-N/train.jsonl        the student's training rows: labelled, then pseudo-labelled (with their loss weight)
      round-N/round.json         the round's counts; written last, so its presence means the pseudo-labels are done
      round-N/student/           a run dir: the config with data.train = train.jsonl, trained from model.name

Every run is an ordinary run directory (`sftlab eval`, `generate`, `merge` work on it, and its config.yaml trains
it again by hand). Students start from the config's model, not from their teacher (Noisy Student's choice: errors a
teacher learned are not inherited, only its labels). Rerunning continues: a finished run is kept, an unfinished one
resumes from its newest checkpoint (`--resume-or-start`; give train.save_every), a round whose round.json exists
keeps its pseudo-labels, provided they came from the teacher that is there now (its weights' sha256).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig, build_config, dump_config
from ..data import RawRecord, encode_dataset, read_records
from ..data.encode import check_task_format
from ..data.formats import parse_record
from ..data.readers import is_hub_name
from ..errors import ConfigError, DataError, RunDirError
from ..eval.evaluate import evaluate
from ..files import read_json_object, recorded, weights_digest
from ..quant import decoded_once
from ..recipe import train
from ..rundir import config_changes, describe_changes
from ..runs import load_run
from .config import SECTION, SelfTrainConfig
from .plot import plot_rounds
from .predict import Agreement, Prediction, classify, generate_answers
from .rows import (
    RESPONSE_FIELD,
    check_columns,
    check_format,
    labelled_and_dev,
    read_pool,
    source_row,
    write_json,
    write_jsonl,
)
from .select import class_shares, select

RECORD = "selftrain.json"
CONFIG_FILE = "selftrain.yaml"
TEACHER = "00-teacher"
WEIGHT_FIELD = "loss_weight"  # the student's data.weight_field, unless the config names its own
METRIC_KEYS = ("eval_loss", "eval_accuracy", "eval_perplexity")
RESULT_KEYS = ("status", "steps", "train_loss", *METRIC_KEYS, "train_time_s", "wall_time_s")
OK = ("completed", "early-stopped")


@dataclass
class SelfTraining:
    cfg: (
        RunConfig  # the teacher's and every student's config; train.output_dir is the self-training directory
    )
    st: SelfTrainConfig
    source: str

    @property
    def root(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def classifier(self) -> bool:
        return self.cfg.model.task == "seq-cls"

    @property
    def weight_field(self) -> str:
        return self.cfg.data.weight_field or WEIGHT_FIELD

    def teacher_run(self) -> Path:
        return Path(self.st.teacher) if self.st.teacher else self.root / TEACHER

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def student_dir(self, r: int) -> Path:
        return self.round_dir(r) / "student"

    def last_run(self) -> Path:
        """The run whose model self-training ends with (what a pipeline's next stage starts from)."""
        return self.student_dir(self.st.rounds)

    def finished(self) -> bool:
        return (self.last_run() / "final" / "sftlab.json").is_file()

    def saved_config(self) -> str:
        return yaml.safe_dump(
            {**yaml.safe_load(dump_config(self.cfg)), SECTION: self.st.model_dump(mode="json")},
            sort_keys=False,
        )


def check(job: SelfTraining) -> None:
    """Everything that can be checked before anything trains: the kind of data, the files, the teacher."""
    cfg, where = job.cfg, job.source
    if cfg.data.tasks is not None:
        raise ConfigError(f"{where}: data.tasks: self-training labels one task's pool; give one data.train")
    if cfg.train.objective != "sft":
        raise ConfigError(
            f"{where}: train.objective: {cfg.train.objective}: self-training trains on labels (sft); run the "
            "self-supervised stage first (sftlab pipeline) and start from its model"
        )
    check_format(cfg.data, where)
    check_task_format(cfg.model.task, cfg.data.format)
    check_columns(cfg.data, where)
    for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
                       (f"{SECTION}.unlabelled", job.st.unlabelled)):  # fmt: skip
        if value is not None and not is_hub_name(value) and not Path(value).exists():
            raise DataError(f"{where}: {key}: {value}: data file or directory does not exist")
    student_config(job, 1, None, None, 0)  # student_train's keys are valid train: keys
    if job.st.teacher is not None and not (Path(job.st.teacher) / "final" / "sftlab.json").is_file():
        raise RunDirError(
            f"{where}: {SECTION}.teacher: {job.st.teacher}: not a finished run directory (no final/sftlab.json)"
        )


def _check_saved(job: SelfTraining) -> None:
    """SELF_DIR holds a self-training of this config, or none; only self_train.rounds may differ (to add rounds)."""
    path = job.root / CONFIG_FILE
    if not path.is_file():
        return
    have, want = yaml.safe_load(path.read_text()) or {}, yaml.safe_load(job.saved_config())
    for d in (have, want):
        d.get(SECTION, {}).pop("rounds", None)
    if have == want:
        return
    keys = sorted(k for k, a, b in _flat_diff(have, want))
    raise ConfigError(
        f"{job.root} holds a self-training of another config (differs in {', '.join(keys[:5])}); put the config "
        f"back, or remove {job.root} (or choose another train.output_dir) to start over"
    )


def _flat_diff(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            x
            for k in sorted(set(a) | set(b), key=str)
            for x in _flat_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        ]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


# -- the runs ------------------------------------------------------------------------------------------------


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "completed"}


def _result(summary: dict) -> dict:
    return {k: summary[k] for k in RESULT_KEYS if summary.get(k) is not None}


def train_run(cfg: RunConfig, what: str, log) -> dict:
    """A run of `cfg`: kept when finished, resumed when it has a checkpoint, started otherwise; its summary."""
    run_dir = Path(cfg.train.output_dir)
    diff = config_changes(run_dir, cfg)
    if diff:
        raise ConfigError(
            f"self-train: {what}: {run_dir} holds a run of another config ({describe_changes(diff)}); remove it to "
            "train it again"
        )
    if (run_dir / "final" / "sftlab.json").is_file():
        log(f"self-train: {what}: finished in {run_dir}, kept")
        return _summary(run_dir)
    log(f"self-train: {what} in {run_dir}")
    return train(cfg, resume_or_start=True, log=log)


def with_changes(
    cfg: RunConfig, source: str, data: dict, output_dir: Path, train_keys: dict | None = None
) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    raw["data"].update(data)
    if train_keys:
        if "output_dir" in train_keys:
            raise ConfigError(f"{source}: {SECTION}.student_train.output_dir: set by self-training; drop it")
        raw["train"].update(train_keys)
    raw["train"]["output_dir"] = str(output_dir)
    return build_config(raw, source)


def student_config(
    job: SelfTraining, r: int, names: list[str] | None, dev: Path | None, kept: int
) -> RunConfig:
    """The config with data.train = the round's labelled + pseudo-labelled rows (weighted), the dev rows as eval."""
    weight_field = (
        job.weight_field if kept else job.cfg.data.weight_field
    )  # no pseudo row: no weights to read
    data = {"train": str(job.round_dir(r) / "train.jsonl"), "eval": str(dev) if dev else None,
            "eval_fraction": 0.0, "limit": None, "weight_field": weight_field}  # fmt: skip
    if names is not None:
        data["label_names"] = names
    source = f"{job.source}: round {r} student ({SECTION}.student_train)"
    return with_changes(job.cfg, source, data, job.student_dir(r), job.st.student_train)


# -- pseudo-labels -------------------------------------------------------------------------------------------


def label_counts(job: SelfTraining, labelled: list[RawRecord], names: list[str]) -> list[int]:
    """How many labelled rows each class has (the ratio `balance: labelled` keeps)."""
    counts = [0] * len(names)
    for rec in labelled:
        label = str(parse_record(rec, "classification").label)
        if label in names:
            counts[names.index(label)] += 1
        elif job.cfg.data.label_names and label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
            counts[int(label)] += 1
        else:
            raise DataError(f"{rec.where}: label: expected one of {', '.join(names)} (the teacher's classes)")
    return counts


def _answered(rec: RawRecord, fmt: str, answer: str) -> dict:
    if fmt == "messages":
        return {"messages": [*rec.fields["messages"], {"role": "assistant", "content": answer}]}
    return {**rec.fields, RESPONSE_FIELD[fmt]: answer}


def pseudo_label(job: SelfTraining, r: int, teacher: Path, pool: list[RawRecord], labelled: list[RawRecord],
                 names: list[str] | None, dev: Path | None, log) -> dict:  # fmt: skip
    """Round r's pseudo-labels from `teacher`: predict the pool, select, write pseudo.jsonl, train.jsonl and (last)
    round.json. Returns round.json's content."""
    st, data, rd = job.st, job.cfg.data, job.round_dir(r)
    model, tok, tcfg = load_run(teacher, trust_remote_code=job.cfg.model.trust_remote_code)
    if tcfg.model.task != job.cfg.model.task:
        raise ConfigError(
            f"{job.source}: round {r} teacher {teacher} is a {tcfg.model.task} model; this config trains "
            f"{job.cfg.model.task}"
        )
    log(f"self-train: round {r}: teacher {teacher} labels {len(pool)} unlabelled records")
    meta: dict = {"round": r, "teacher": str(teacher), "teacher_digest": weights_digest(teacher / "final"),
                  "pool": len(pool)}  # fmt: skip
    agreement = None
    if names is None and st.agreement_samples:
        agreement = Agreement(st.agreement_samples, st.agreement_temperature, st.min_agreement,
                              (job.cfg.train.seed, r))  # fmt: skip
    with decoded_once(model):  # a quantised teacher decodes each weight once, not per batch or new token
        # a given teacher: its dev metrics, for round 0's point
        if r == 1 and job.st.teacher and dev is not None:
            meta["teacher_result"] = dev_metrics(model, tok, job, names, dev)
        if names is not None:
            preds = classify(model, tok, data, pool, names, st.batch_size)
        else:
            preds = generate_answers(model, tok, data, pool, st.max_new_tokens, st.batch_size, agreement)
    if names is not None:
        counts = label_counts(job, labelled, names)
        shares = class_shares(counts, st.balance)
        kept = select([p.label for p in preds], [p.confidence for p in preds], len(names), st.threshold,
                      st.top_k_per_class, shares)  # fmt: skip
        meta["labelled_per_class"] = dict(zip(names, counts))
    else:
        usable = [p.reason is None for p in preds]
        kept = select([0] * len(preds), [p.confidence for p in preds], 1, st.threshold, st.top_k_per_class,
                      [1.0], usable)  # fmt: skip
        meta["not_usable"] = dict(Counter(p.reason for p in preds if p.reason))
        if agreement is not None:
            meta["agreement"] = {"samples": agreement.samples, "temperature": agreement.temperature,
                                 "min_agreement": agreement.minimum,
                                 "mean_kept": sum(preds[i].agreement for i in kept) / len(kept) if kept else None}  # fmt: skip
    meta.update(_counts(preds, kept, names, st.threshold))
    if names is not None:
        _warn_unconfident(meta, names, shares, st.threshold, r, log)
    rows, train_rows = [], [source_row(rec.fields, data, _extra(job)) for rec in labelled]
    for i in kept:
        p, rec = preds[i], pool[i]
        fields = (
            {**rec.fields, "label": names[p.label]}
            if names is not None
            else _answered(rec, data.format, p.response)
        )
        row = source_row(fields, data)
        rows.append({**row, "confidence": p.confidence, **_logprob(p), "round": r, "pool_index": i,
                     "where": rec.where})  # fmt: skip
        train_rows.append({**row, job.weight_field: st.pseudo_weight})
    write_jsonl(rd / "pseudo.jsonl", rows)
    write_jsonl(rd / "train.jsonl", train_rows)
    meta.update({"pseudo": str(rd / "pseudo.jsonl"), "train": str(rd / "train.jsonl"),
                 "train_rows": {"labelled": len(labelled), "pseudo": len(kept)}, "pseudo_weight": st.pseudo_weight})  # fmt: skip
    write_json(rd / "round.json", meta)
    per = meta.get("per_class")
    shown = ", ".join(f"{k} {v['kept']}" for k, v in per.items()) if per else f"{len(kept)}"
    log(f"self-train: round {r}: kept {len(kept)} of {len(pool)} pseudo-labels ({shown})")
    return meta


def _warn_unconfident(
    meta: dict, names: list[str], shares: list[float], threshold: float, r: int, log
) -> None:
    """Classes the kept set should hold (share > 0) but the teacher never predicts with confidence keep no
    pseudo-label (the others are balanced without them): named in round.json (`no_confident`) and in a warning."""
    missing = [n for n, s in zip(names, shares) if s > 0 and meta["per_class"][n]["confident"] == 0]
    if not missing:
        return
    meta["no_confident"] = missing
    log(
        f"warning: self-train: round {r}: no confident pseudo-label (threshold {threshold}) for class(es) "
        f"{', '.join(missing)}: they get none this round; the other classes are balanced without them"
    )


def _extra(job: SelfTraining) -> tuple[str, ...]:
    return (job.cfg.data.weight_field,) if job.cfg.data.weight_field else ()


def _logprob(p: Prediction) -> dict:
    out = {"mean_logprob": p.mean_logprob} if p.mean_logprob is not None else {}
    return {**out, "agreement": p.agreement} if p.agreement is not None else out


def _counts(preds: list[Prediction], kept: list[int], names: list[str] | None, threshold: float) -> dict:
    confident = [p.confidence >= threshold and p.reason is None for p in preds]
    out = {
        "confident": sum(confident),
        "kept": len(kept),
        "mean_confidence_kept": sum(preds[i].confidence for i in kept) / len(kept) if kept else None,
    }
    if names is not None:
        keep = set(kept)
        out["per_class"] = {
            name: {
                "predicted": sum(p.label == c for p in preds),
                "confident": sum(p.label == c and confident[i] for i, p in enumerate(preds)),
                "kept": sum(p.label == c for i, p in enumerate(preds) if i in keep),
            }
            for c, name in enumerate(names)
        }
    return out


def dev_metrics(model, tok, job: SelfTraining, names: list[str] | None, dev: Path) -> dict:
    """A model's loss (and accuracy or perplexity) on the dev rows, as a run's eval reports it."""
    recs = read_records(dev, job.cfg.data.columns)
    examples = encode_dataset(recs, tok, job.cfg.data, job.cfg.model.task, label_names=names).examples
    batch = job.cfg.train.eval_batch_size or job.cfg.train.batch_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = evaluate(model, examples, job.cfg.model.task, batch, pad, job.cfg.perf)
    return {k: res[k] for k in METRIC_KEYS if k in res}


def teacher_labels(teacher: Path) -> list[str] | None:
    info = read_json_object(teacher / "final" / "sftlab.json", "run info")
    names = info.get("label_names")
    return list(names) if isinstance(names, list) else None


# -- the rounds ----------------------------------------------------------------------------------------------


def run_self_train(job: SelfTraining, log=print) -> dict:
    """Train the teacher (unless given) and every unfinished round; returns (and writes) selftrain.json. A run that
    fails, diverges or is interrupted stops it (the record says so); a rerun continues there."""
    check(job)
    _check_saved(job)
    job.root.mkdir(parents=True, exist_ok=True)
    (job.root / CONFIG_FILE).write_text(job.saved_config())
    labelled, dev_rows = labelled_and_dev(job.cfg.data, job.cfg.train.seed)
    dev = None
    if dev_rows:
        dev = job.root / "dev.jsonl"
        write_jsonl(dev, [source_row(r.fields, job.cfg.data) for r in dev_rows])
    else:
        log("warning: self-train: no dev rows (data.eval or data.eval_fraction), so no dev metric per round")
    record: dict = {"config": job.source, "output_dir": str(job.root), "status": "running", "rounds_planned":
                    job.st.rounds, "teacher": None, "rounds": []}  # fmt: skip
    with recorded(record, lambda r: _finish(job, r)):
        record["status"] = _rounds(job, record, labelled, dev, log)
    return record


def _rounds(job: SelfTraining, record: dict, labelled: list[RawRecord], dev: Path | None, log) -> str:
    teacher = job.teacher_run()
    if job.st.teacher is None:
        t_cfg = with_changes(job.cfg, f"{job.source}: teacher", {}, teacher)
        record["teacher"] = {"run_dir": str(teacher), "given": False, "status": "running"}
        _write(job, record)
        summary = _tracked(record["teacher"], lambda: train_run(t_cfg, "teacher (labelled rows only)", log))
        if summary["status"] not in OK:
            return "failed"
    else:
        record["teacher"] = {"run_dir": str(teacher), "given": True, "status": "given", "result": None}
    names = teacher_labels(teacher) if job.classifier else None
    if job.classifier and not names:
        raise RunDirError(
            f"{teacher}/final/sftlab.json: label_names: the teacher classifier names no classes"
        )
    pool = read_pool(job.st.unlabelled, job.cfg.data, job.st.skip, job.st.limit)
    for r in range(1, job.st.rounds + 1):
        meta_path = job.round_dir(r) / "round.json"
        digest = weights_digest(teacher / "final")
        if meta_path.is_file():
            meta = read_json_object(meta_path, "round record", ConfigError)
            if meta.get("teacher_digest") != digest:
                raise ConfigError(
                    f"self-train: round {r}: its pseudo-labels ({meta_path.parent}) came from another model than "
                    f"the teacher now in {teacher} (retrained since); remove {meta_path.parent} and the rounds "
                    "after it to redo them"
                )
            log(
                f"self-train: round {r}: pseudo-labels kept ({meta['kept']} in {meta_path.parent / 'pseudo.jsonl'})"
            )
        else:
            meta = pseudo_label(job, r, teacher, pool, labelled, names, dev, log)
        if r == 1 and "teacher_result" in meta:
            record["teacher"]["result"] = meta["teacher_result"]
        row = {k: v for k, v in meta.items() if k != "teacher_result"}
        row["student"] = {"run_dir": str(job.student_dir(r)), "status": "running"}
        record["rounds"].append(row)
        _write(job, record)
        if not meta["kept"]:
            log(
                f"warning: self-train: round {r} kept no pseudo-label; its student trains on the labelled rows alone"
            )
        s_cfg = student_config(job, r, names, dev, meta["kept"])
        summary = _tracked(row["student"], lambda c=s_cfg, r=r: train_run(c, f"round {r} student", log))
        _write(job, record)
        if summary["status"] not in OK:
            return "failed"
        teacher = job.student_dir(r)
    return "completed"


def _tracked(entry: dict, run) -> dict:
    """Run a training; its status and result go into `entry` (interrupted or failed too, then re-raised)."""
    try:
        summary = run()
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        raise
    except Exception as e:
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    entry["status"], entry["result"] = summary["status"], _result(summary)
    return summary


def _write(job: SelfTraining, record: dict) -> None:
    write_json(job.root / RECORD, record)


def _finish(job: SelfTraining, record: dict) -> None:
    """selftrain.json, selftrain.png and summary.json (the last student's result) as things stand."""
    _write(job, record)
    rounds = record["rounds"]
    last = rounds[-1]["student"] if rounds else (record["teacher"] or {})
    summary = {**(last.get("result") or {}), "status": record["status"], "rounds": len(rounds),
               "run_dir": last.get("run_dir")}  # fmt: skip
    write_json(job.root / "summary.json", summary)
    try:
        plot_rounds(record, job.root / "selftrain.png")
    except Exception as e:  # a plot must never hide the run's own outcome
        print(f"warning: selftrain.png not drawn: {e}")

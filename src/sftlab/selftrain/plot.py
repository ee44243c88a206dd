"""selftrain.png: the dev metric of each round's model (round 0: the teacher) and how many pseudo-labels each
round kept (per class for a classifier)."""

from __future__ import annotations

from pathlib import Path


def metric_of(result: dict | None) -> tuple[str, float] | None:
    """The headline dev number: accuracy for a classifier, else the loss."""
    for key in ("eval_accuracy", "eval_loss"):
        if result and result.get(key) is not None:
            return key, float(result[key])
    return None


def plot_rounds(record: dict, out_png: Path) -> None:
    rounds = record.get("rounds") or []
    if not rounds:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, metric_of((record.get("teacher") or {}).get("result")))]
    points += [(r["round"], metric_of(r.get("student", {}).get("result"))) for r in rounds]
    points = [(x, m) for x, m in points if m is not None]
    fig, (ax_m, ax_n) = plt.subplots(1, 2, figsize=(11, 4))
    if points:
        key = points[-1][1][0]
        ax_m.plot([x for x, _ in points], [m[1] for _, m in points], "o-")
        ax_m.set_ylabel(f"dev {key.removeprefix('eval_')}")
    ax_m.set_xticks([x for x, _ in points] or [0])
    ax_m.set_xlabel("round (0: teacher)")
    ax_m.set_title("dev metric per round")
    ax_m.grid(alpha=0.3)
    xs = [r["round"] for r in rounds]
    per_class = [r.get("per_class") for r in rounds]
    if all(per_class):
        bottom = [0] * len(rounds)
        for name in per_class[0]:
            n = [pc.get(name, {}).get("kept", 0) for pc in per_class]
            ax_n.bar(xs, n, bottom=bottom, label=str(name))
            bottom = [b + v for b, v in zip(bottom, n)]
        ax_n.legend(title="class")
    else:
        ax_n.bar(xs, [r.get("kept", 0) for r in rounds])
    ax_n.set_xlabel("round")
    ax_n.set_ylabel("pseudo-labels kept")
    ax_n.set_title("pseudo-labelled rows per round")
    ax_n.set_xticks(xs)
    ax_n.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

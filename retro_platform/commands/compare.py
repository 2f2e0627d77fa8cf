"""`retro compare`: the training runs of an MLflow experiment side by side, and their valid curves.

A second table, when runs have been through `retro eval`, shows their bits per byte per overlap bucket
(how much of each valid chunk its retrieved neighbours already contain, ``retro_platform.overlap``).
"""

from __future__ import annotations

import logging

import mlflow
from mlflow.tracking import MlflowClient

from retro_platform import storage, tracking
from retro_platform.config import PlatformConfig
from retro_platform.errors import RetroError
from retro_platform.overlap import BUCKETS

logger = logging.getLogger(__name__)

COLUMNS = [
    ("valid bpb (retrieval)", "eval_valid_bpb_retrieval"),
    ("valid bpb (no retrieval)", "eval_valid_bpb_no_retrieval"),
    ("final train loss", "train_loss"),
    ("tokens/s", "tokens_per_s"),
]


def comparison_rows(
    config: PlatformConfig, experiment: str | None = None, comparison: str | None = None
) -> list[dict]:
    """One row per training run: name, kind, differing params, final metrics, metric histories."""
    client = MlflowClient(config.tracking_uri)
    name = experiment or config.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise RetroError(f"no MLflow experiment named {name!r} in {config.tracking_uri}")
    query = "tags.stage = 'train'" + (f" and tags.comparison = '{comparison}'" if comparison else "")
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"])
    if not runs:
        raise RetroError(f"experiment {name!r} has no training runs yet")
    keys = set().union(*(r.data.params for r in runs))
    differing = sorted(
        k for k in keys if len({r.data.params.get(k) for r in runs}) > 1 and not k.startswith("train.name")
    )
    rows = []
    for r in runs:
        history = client.get_metric_history(
            r.info.run_id, "valid_bpb_retrieval"
        ) or client.get_metric_history(r.info.run_id, "valid_bpb_no_retrieval")
        rows.append(
            {
                "run": r.info.run_name,
                "run_id": r.info.run_id,
                "kind": r.data.tags.get("model_kind", "?"),
                "params": {k: r.data.params.get(k) for k in differing},
                "metrics": r.data.metrics,
                "curve": [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)],
                "loss_curve": [
                    (m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train_loss")
                ],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    header = ["run", "kind", *[c for c, _ in COLUMNS], *sorted(rows[0]["params"])]
    lines = [header]
    for row in rows:
        values = [row["run"], row["kind"]]
        for _, key in COLUMNS:
            value = row["metrics"].get(key)
            values.append("-" if value is None else f"{value:.4f}" if value < 100 else f"{value:.0f}")
        values += [str(row["params"][k]) for k in sorted(row["params"])]
        lines.append(values)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines)


def format_overlap_table(rows: list[dict]) -> str | None:
    """Bits per byte per overlap bucket (rows) of every run that has them (columns), or None if none has.

    Per run: the scored tokens of each bucket, then bpb with retrieval (RETRO runs) and without.
    """
    runs = [row for row in rows if f"eval_valid_tokens_overlap_{BUCKETS[0]}" in row["metrics"]]
    if not runs:
        return None
    columns = []  # (header, run row, metric key)
    for row in runs:
        columns.append((f"{row['run']} tokens", row, "eval_valid_tokens_overlap_{}"))
        for label in ("retrieval", "no_retrieval"):
            if any(k.startswith(f"eval_valid_bpb_{label}_overlap_") for k in row["metrics"]):
                header = f"{row['run']} bpb ({label.replace('_', ' ')})"
                columns.append((header, row, f"eval_valid_bpb_{label}_overlap_{{}}"))
    lines = [["overlap", *[header for header, _, _ in columns]]]
    for bucket in BUCKETS:
        values = [bucket]
        for _, row, key in columns:
            value = row["metrics"].get(key.format(bucket))
            values.append("-" if value is None else f"{value:.0f}" if "tokens" in key else f"{value:.4f}")
        lines.append(values)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def plot_curves(rows: list[dict], location: str) -> str:
    """Train-loss and valid-bpb curves of every run in one PNG at ``location`` (any storage location)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        if row["loss_curve"]:
            ax1.plot(*zip(*row["loss_curve"], strict=True), label=f"{row['run']} ({row['kind']})")
        if row["curve"]:
            ax2.plot(*zip(*row["curve"], strict=True), marker="o", label=f"{row['run']} ({row['kind']})")
    ax1.set(title="train loss", xlabel="step", ylabel="nats/token")
    ax2.set(title="valid bits per byte", xlabel="step", ylabel="bpb")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        storage.write_path_atomic(location, lambda path: fig.savefig(path, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return location


def compare_experiment(
    config: PlatformConfig, experiment: str | None = None, comparison: str | None = None
) -> list[dict]:
    """Print the comparison table (and the overlap table when runs have one), write the curves PNG and
    log both to a `compare` run."""
    rows = comparison_rows(config, experiment, comparison)
    table = format_table(rows)
    overlap = format_overlap_table(rows)
    if overlap is not None:
        table += "\n\nvalid bits per byte by overlap of each chunk with its retrieved neighbours\n" + overlap
    print(table)
    png = plot_curves(
        rows, storage.join(str(config.work_dir), "compare", f"{experiment or config.tracking.experiment}.png")
    )
    print(f"\ncurves: {png}")
    with tracking.start_run(config, stage="compare", run_name=f"compare-{comparison or 'all'}"):
        tracking.log_artifact(png)
        mlflow.log_text(table, "comparison.txt")
    return rows

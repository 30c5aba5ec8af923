"""The bench plot: speed-up and fidelity against sequence length, as a PNG."""

from __future__ import annotations

from pathlib import Path


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [row for row in report["results"] if "error" not in row]
    if not rows:
        raise ValueError("no sequence length ran: nothing to plot")
    lengths = [row["seq_len"] for row in rows]
    first_output = next(iter(rows[0]["outputs"]))
    series = {
        "output cosine": [row["outputs"][first_output]["cosine"] for row in rows],
        "softmax mass retrieved": [_mean_over_layers(row, "mass_retrieved") for row in rows],
        "recall of exact top-k": [_mean_over_layers(row, "recall") for row in rows],
    }

    figure, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    speed.plot(lengths, [row["speedup"] for row in rows], marker="o")
    speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    speed.set(xscale="log", xlabel="sequence length", ylabel="speed-up (original / converted)",
              title=f"end-to-end speed-up, {report['settings']['threads']} thread(s)")
    for label, values in series.items():
        if any(v is not None for v in values):
            quality.plot(lengths, [float("nan") if v is None else v for v in values], marker="o", label=label)
    quality.set(xscale="log", xlabel="sequence length", ylabel="fidelity", title="fidelity")
    quality.legend(loc="lower left")
    for axis in (speed, quality):
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    figure.suptitle(Path(report["original"]).name)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mean_over_layers(row: dict, key: str):
    values = [layer[key] for layer in row.get("layers") or [] if layer.get(key) is not None]
    return sum(values) / len(values) if values else None

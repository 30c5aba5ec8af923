"""The plots of `ice-onnx bench` and `ice-onnx eval causal-lm`: speed-up and fidelity against
sequence length, as PNGs."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _by_length(axes, lengths: list[int]) -> None:
    """Log-scale length axes ticked at the measured lengths."""
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.minorticks_off()
        axis.grid(alpha=0.3)


def plot_bench(report: dict, path: Path) -> None:
    plt = _pyplot()
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
    speed.set(xlabel="sequence length", ylabel="speed-up (original / converted)",
              title=f"end-to-end speed-up, {report['settings']['threads']} thread(s)")
    for label, values in series.items():
        if any(v is not None for v in values):
            quality.plot(lengths, [float("nan") if v is None else v for v in values], marker="o", label=label)
    quality.set(xlabel="sequence length", ylabel="fidelity", title="fidelity")
    quality.legend(loc="lower left")
    _by_length((speed, quality), lengths)
    figure.suptitle(Path(report["original"]).name)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mean_over_layers(row: dict, key: str):
    values = [layer[key] for layer in row.get("layers") or [] if layer.get(key) is not None]
    return sum(values) / len(values) if values else None


def plot_causal_lm(report: dict, path: Path) -> None:
    """Perplexity ratio and speed-up against length, one line per text (and the pooled one)."""
    plt = _pyplot()
    measured = [row for row in report["rows"] if row.get("ppl_ratio") is not None]
    if not measured:
        raise ValueError("no length ran: nothing to plot")
    figure, (ratio, speed) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for text in dict.fromkeys(row["text"] for row in measured):
        rows = [row for row in measured if row["text"] == text]
        lengths = [row["length"] for row in rows]
        ratio.plot(lengths, [row["ppl_ratio"] for row in rows], marker="o", label=text)
        speed.plot(lengths, [row["speedup"] for row in rows], marker="o", label=text)
    for axis in (ratio, speed):
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.legend(loc="best", fontsize="small")
    ratio.set(xlabel="tokens", ylabel="perplexity converted / original", title="perplexity ratio")
    speed.set(xlabel="tokens", ylabel="speed-up (original / converted)",
              title=f"forward-pass speed-up, {report['settings']['threads']} thread(s)")
    _by_length((ratio, speed), sorted({row["length"] for row in measured}))
    figure.suptitle(f"{Path(report['model']).name}: {report['settings']['convert_label']}")
    figure.savefig(path, dpi=120)
    plt.close(figure)

"""PNG chart of a `kioskd bench` result: decode speed and time to first chunk per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEMS = (
    ("raw", "raw llama-cpp-python loop", "raw_decode_tokens_per_s", "raw_first_token_ms"),
    ("kioskd", "kioskd over MQTT", "kioskd_decode_tokens_per_s", "kioskd_first_chunk_ms"),
    (
        "server",
        "llama_cpp.server + MQTT bridge",
        "server_decode_tokens_per_s",
        "server_first_chunk_ms",
    ),
)


def render(result: dict[str, Any], path: Path) -> Path:
    """Write the chart; needs matplotlib (the `bench` extra)."""
    import matplotlib  # noqa: PLC0415 - optional dependency, only for charts

    matplotlib.use("Agg")  # no display on a kiosk or in CI
    import matplotlib.pyplot as plt  # noqa: PLC0415

    summary = result["summary"]
    lengths = list(summary)
    shown = [s for s in SYSTEMS if all(s[2] in summary[n] for n in lengths)]
    figure, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(shown)
    for index, (_key, label, speed_key, first_key) in enumerate(shown):
        xs = [i + index * width for i in range(len(lengths))]
        speed.bar(xs, [summary[n][speed_key] for n in lengths], width, label=label)
        latency.bar(xs, [summary[n][first_key] for n in lengths], width, label=label)
    for axis, title, unit in (
        (speed, "Decode speed (median)", "tokens/s"),
        (latency, "Time to first chunk / token (median)", "ms"),
    ):
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(lengths))])
        axis.set_xticklabels([f"{n} tokens" for n in lengths])
        axis.grid(axis="y", alpha=0.3)
    handles, labels = speed.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(shown), fontsize=9)
    figure.suptitle(
        f"{Path(result['model']).name}, {result['threads']} thread(s), {result['reps']} reps",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

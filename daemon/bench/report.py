"""Every table and chart of `kioskd bench`: the lines printed after a run, and bench.png.

Each function takes a benchmark's typed result and returns text (or writes the chart); the
CLI prints it. Nothing here measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daemon.sampling import GrammarMode

if TYPE_CHECKING:
    from daemon.bench.answers import AnswersResult
    from daemon.bench.chunking import ChunkingResult
    from daemon.bench.compare import CompareResult, CompareRow
    from daemon.bench.contention import ContentionResult
    from daemon.bench.conversation import ConversationResult
    from daemon.bench.fleet import FleetResult
    from daemon.bench.grammar import GrammarResult
    from daemon.bench.prompt_reuse import PromptReuseResult
    from daemon.bench.stats import Ratio
    from daemon.bench.telemetry import TelemetryResult
    from daemon.bench.threads import ThreadsResult
    from daemon.bench.web import WebResult


def _show(value: object) -> str:
    return "-" if value is None else str(value)


def full_results(path: Path) -> str:
    return f"full results: {path}"


# --- compare and server ----------------------------------------------------------------------


def compare(result: CompareResult) -> str:
    lines = [
        f"model {result.run.model}, {result.run.threads} threads, {result.run.reps} reps; "
        f"kioskd RSS {result.kioskd_rss_mib} MiB, "
        f"{result.kioskd_rss_after_longest_question_mib} MiB after the longest question "
        f"(budget {result.rss_budget_mib} MiB), "
        f"idle CPU {result.kioskd_idle_cpu_percent_of_one_core} % of a core",
        f"{'tokens':>6} {'raw tok/s':>10} {'kioskd tok/s':>13} {'ratio':>7} {'paired':>7} "
        f"{'overhead ms (median/p99)':>26} {'gap p99 ms raw/kioskd':>22}",
    ]
    for length, row in result.summary.items():
        lines.append(
            f"{length:>6} {row.raw_decode_tokens_per_s:>10} "
            f"{row.kioskd_decode_tokens_per_s:>13} {row.ratio_kioskd_over_raw:>7} "
            f"{row.ratio_median_of_pairs:>7} "
            f"{row.first_chunk_overhead_ms_median:>13} / "
            f"{row.first_chunk_overhead_ms_p99:<10} "
            f"{_show(row.raw_gap_p99_ms):>10} / {row.kioskd_gap_p99_ms}"
        )
    for length, row in result.summary.items():
        if row.server:
            server = row.server
            lines.append(
                f"{length:>6} llama_cpp.server + bridge: {server.server_decode_tokens_per_s} "
                f"tok/s, first chunk {server.server_first_chunk_ms} ms (kioskd "
                f"{row.kioskd_first_chunk_ms} ms), gap p99 {server.server_gap_p99_ms} ms; "
                f"kioskd/server {server.ratio_kioskd_over_server} (paired "
                f"{server.ratio_kioskd_over_server_median_of_pairs})"
            )
    pooled = result.first_chunk_all_lengths
    if pooled is not None:
        lines.append(
            f"first chunk over all lengths ({pooled.samples_per_system} answers each): kioskd "
            f"{pooled.kioskd_ms_median} ms, server {pooled.server_ms_median} ms, raw "
            f"{pooled.raw_ms_median} ms; kioskd - server "
            f"{pooled.kioskd_minus_server_ms_median_of_pairs} ms (median of pairs), kioskd "
            f"sooner in {pooled.kioskd_sooner_in_pairs}"
        )
    if result.server_rss_mib is not None:
        lines.append(
            f"llama_cpp.server RSS {result.server_rss_mib} MiB, idle CPU "
            f"{result.server_idle_cpu_percent_of_one_core} % of a core"
        )
    return "\n".join(lines)


def _speed_and_first(system: str, row: CompareRow) -> tuple[float, float] | None:
    """A system's decode tok/s and first chunk (or token) ms in a row; None if not measured."""
    if system == "raw":
        return row.raw_decode_tokens_per_s, row.raw_first_token_ms
    if system == "kioskd":
        return row.kioskd_decode_tokens_per_s, row.kioskd_first_chunk_ms
    if row.server is None:
        return None
    return row.server.server_decode_tokens_per_s, row.server.server_first_chunk_ms


CHART_SYSTEMS = (
    ("raw", "raw llama-cpp-python loop"),
    ("kioskd", "kioskd over MQTT"),
    ("server", "llama_cpp.server + MQTT bridge"),
)


def chart(result: CompareResult, path: Path) -> Path:
    """Decode speed and time to first chunk per system as a PNG; needs matplotlib (the `bench`
    extra): ImportError without it."""
    import matplotlib  # noqa: PLC0415 - optional dependency, only for charts

    matplotlib.use("Agg")  # no display on a kiosk or in CI
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = list(result.summary.values())
    lengths = list(result.summary)
    shown = [
        (system, label)
        for system, label in CHART_SYSTEMS
        if all(_speed_and_first(system, row) for row in rows)
    ]
    figure, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(shown)
    for index, (system, label) in enumerate(shown):
        xs = [i + index * width for i in range(len(lengths))]
        figures = [_speed_and_first(system, row) or (0.0, 0.0) for row in rows]
        speed.bar(xs, [tps for tps, _ in figures], width, label=label)
        latency.bar(xs, [first for _, first in figures], width, label=label)
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
        f"{Path(result.run.model).name}, {result.run.threads} thread(s), {result.run.reps} reps",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- one daemon or engine per setting --------------------------------------------------------


def telemetry(result: TelemetryResult) -> str:
    return (
        f"{result.tokens} tokens, {result.run.reps} reps: telemetry every 1 s "
        f"{result.telemetry_1s_tokens_per_s_median} tok/s, off "
        f"{result.telemetry_off_tokens_per_s_median} tok/s; drop "
        f"{result.drop_percent_median_of_pairs} % (median of paired runs)"
    )


def prompt_reuse(result: PromptReuseResult) -> str:
    return (
        f"system prompt {result.system_prompt_tokens} tokens: first token "
        f"{result.first_token_ms_with_reuse_median} ms with reuse, "
        f"{result.first_token_ms_without_reuse_median} ms without "
        f"(-{result.reduction_percent} %)"
    )


def threads(result: ThreadsResult) -> str:
    lines = [
        f"{row.threads:>2} threads: prefill {row.prefill_tokens_per_s:>8} tok/s, "
        f"decode {row.decode_tokens_per_s:>6} tok/s"
        for row in result.rows
    ]
    picks = result.recommended
    lines.append(
        f"recommended: model.threads: {picks['model.threads']}, "
        f"model.threads_batch: {picks['model.threads_batch']}"
    )
    return "\n".join(lines)


def _paired(ratio: Ratio | None) -> str:
    return "-" if ratio is None else f"{ratio.of_medians:.2f} ({ratio.median_of_pairs:.2f})"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def contention(result: ContentionResult) -> str:
    """The contention summary as a short table: medians, and in brackets medians of pairs."""
    quota = result.cpu_quota
    limit = (
        f", CPU quota {quota.percent:g}% per daemon (cgroup {quota.kind})"
        if quota
        else ", no CPU quota"
    )
    lines = [
        f"{result.tokens} tokens, {result.run.threads} model threads, {result.hogs} hog(s), "
        f"{result.run.reps} reps{limit}",
        f"{'variant':<9} {'quiet':>6} {'loaded':>6} {'loaded/quiet':>15} "
        f"{'quiet/default':>15} {'loaded/default':>15}" + ("  throttled q/l" if quota else ""),
    ]
    for variant in result.variants:
        row = result.summary[variant]
        over = row.over_default or {}
        line = (
            f"{variant:<9} {row.quiet_tokens_per_s_median:>6.1f} "
            f"{row.loaded_tokens_per_s_median:>6.1f} {_paired(row.loss):>15} "
            f"{_paired(over.get('quiet')):>15} {_paired(over.get('loaded')):>15}"
        )
        if quota:
            shares = row.throttled_share_median
            line += f"  {_percent(shares['quiet'])}/{_percent(shares['loaded'])}"
        lines.append(line)
    lines.append("tok/s: decode medians; ratios: of medians (median of per-rep pairs)")
    if quota:
        lines.append("throttled: median share of 100 ms periods the daemon ran out of quota")
    return "\n".join(lines)


def chunking(result: ChunkingResult) -> str:
    """The chunking summary as a short table (medians over the repetitions)."""
    lines = [
        f"{result.tokens} tokens, {result.run.threads} model threads, {result.run.reps} reps",
        f"{'flush ms':>8} {'chunks':>6} {'msgs':>5} {'tok/chunk':>9} {'first ms':>8} "
        f"{'e2e tok/s':>9} {'chunk tok/s*':>12} {'model tok/s':>11} {'gap p99 ms':>10} "
        f"{'mismatch':>8}",
    ]
    for flush, row in result.summary.items():
        lines.append(
            f"{flush:>8} {row.chunk_messages_median:>6} {row.all_messages_median:>5} "
            f"{row.tokens_per_chunk_median:>9} {row.first_chunk_ms_median:>8} "
            f"{row.end_to_end_tokens_per_s_median:>9} "
            f"{_show(row.chunk_decode_tokens_per_s_median):>12} "
            f"{_show(row.model_decode_tokens_per_s_median):>11} "
            f"{_show(row.chunk_gap_ms_p99_median):>10} {row.text_mismatches:>8}"
        )
    lines.append("* first to last chunk: overstated when chunks are batched")
    return "\n".join(lines)


# --- answers: grammar, lengths, conversations ------------------------------------------------


def grammar(result: GrammarResult) -> str:
    """tok/s per mode, the ratio to free decoding, and the share of tokens chosen unmasked."""
    modes = [mode.value for mode in GrammarMode]
    lines = [f"{'model':24} {'vocab':>7} {'free':>7} " + " ".join(f"{m:>22}" for m in modes)]
    for name, row in result.summary.items():
        cells = [
            f"{row.modes[m].tokens_per_s:6.1f} ({row.modes[m].ratio_over_free:.2f}x, "
            f"{row.modes[m].unmasked_share:.0%})"
            for m in modes
        ]
        lines.append(
            f"{name:24} {row.vocab:>7} {row.free_tokens_per_s:7.1f} "
            + " ".join(f"{c:>22}" for c in cells)
        )
    lines.append("tok/s (ratio to free, share of tokens chosen without the whole-vocabulary mask)")
    return "\n".join(lines)


def answers(result: AnswersResult) -> str:
    lines = []
    for name, row in result.summary.items():
        tokens = row.completion_tokens
        lines.append(
            f"{name:32} stop within 120: {row.stop_within_120_share:6.1%}  tokens min "
            f"{tokens.min} p25 {tokens.p25} median {tokens.median} p75 {tokens.p75} "
            f"p90 {tokens.p90} max {tokens.max}"
        )
    return "\n".join(lines)


def conversation(result: ConversationResult) -> str:
    turn5 = result.turn5
    ms = turn5.first_token_ms_median
    lines = [
        f"turn 5 ({turn5.history_tokens} history tokens, {turn5.turn5_prompt_tokens} "
        f"prompt tokens): first token {ms['restored']} ms with the saved state restored, "
        f"{ms['back_to_back']} ms back to back, {ms['reread']} ms reading the history again "
        f"(-{turn5.cut_by_restore_percent} % and -{turn5.cut_back_to_back_percent} %)",
        f"state of {turn5.state_tokens} tokens: {turn5.state_bytes / 2**20:.1f} MiB, "
        f"{turn5.state_bytes_per_token} bytes per token; restore "
        f"{turn5.restore_ms_median} ms, save {turn5.save_ms_median} ms, prefill of the "
        f"same tokens {turn5.prefill_same_tokens_ms_median} ms",
    ]
    many = result.many
    if many:
        lines.append(
            f"{many.conversations} conversations x 3 turns ({many.seconds} s): RSS "
            f"{many.rss_peak_mib} MiB at most, {many.rss_growth_mib} MiB over one question "
            f"(allowed {many.rss_allowed_growth_mib}); files {many.files_peak_mib} MiB at "
            f"most (max_state_mb {many.max_state_mb}); follow-ups reused "
            f"{many.follow_up_cached_tokens_median} tokens (median)"
        )
    return "\n".join(lines)


# --- fleet and web ---------------------------------------------------------------------------


def fleet(result: FleetResult) -> str:
    return "median questions/s: " + ", ".join(
        f"{size} kiosk(s) {per_s:.2f} (x{result.scaling[size]:.2f})"
        for size, per_s in result.questions_per_s_median.items()
    )


def web(result: WebResult) -> str:
    return (
        f"{result.reps} answers: click to first text on screen "
        f"{result.click_to_screen_ms_median} ms (median), daemon's first token "
        f"{result.daemon_first_token_ms_median} ms; the difference "
        f"{result.overhead_ms_median} ms median, {result.overhead_ms_max} ms max "
        f"(target <= 30 ms median); {result.overhead_to_dom_ms_median} ms to the text in the "
        "page before it is painted\n"
        f"kioskd web: RSS {result.web_rss_mib} MiB (target <= 60), idle CPU "
        f"{result.web_idle_cpu_percent} % of a core over {result.idle_s} s (target < 0.5)"
    )

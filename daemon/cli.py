"""Command line: run, check-config, ask, status, fetch-model, bench."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes
from daemon.config import Config, ConfigError, load, sanitize_device_id

log = logging.getLogger("daemon")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kioskd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kioskd {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=_check_config)

    ask = commands.add_parser("ask", help="ask a kiosk a question and print the streamed answer")
    ask.add_argument("question")
    _add_target_options(ask)
    ask.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")
    ask.add_argument("--json", action="store_true", help="print every stream message as JSON")
    ask.set_defaults(handler=_ask)

    status = commands.add_parser("status", help="print a kiosk's latest health as a table")
    _add_target_options(status)
    status.add_argument("--timeout-s", type=float, default=5.0, help="wait this long for it")
    status.add_argument("--json", action="store_true", help="print the raw health JSON")
    status.set_defaults(handler=_status)

    fetch = commands.add_parser(
        "fetch-model", help="download the production model (Qwen2.5-0.5B-Instruct)"
    )
    fetch.add_argument("--config", type=Path, help="use model.dir from this config")
    fetch.add_argument("--dir", type=Path, help="target directory (default: the models dir)")
    fetch.add_argument("--url", help="download from this https:// or file:// URL instead")
    fetch.set_defaults(handler=_fetch_model)

    bench = commands.add_parser(
        "bench", help="measure kioskd over MQTT against the raw llama-cpp-python loop"
    )
    bench.add_argument("--reps", type=int, default=5, help="repetitions per length")
    bench.add_argument("--tokens", default="64,512", help="answer lengths, comma-separated")
    bench.add_argument("--threads", type=int, help="model threads (default: as kioskd)")
    bench.add_argument("--model", help="GGUF file (default: as kioskd resolves it)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output dir")
    bench.add_argument(
        "--vs-server",
        action="store_true",
        help="also measure llama_cpp.server + an MQTT bridge (needs llama-cpp-python[server])",
    )
    bench.add_argument(
        "--idle-s", type=float, default=60.0, help="then measure idle CPU for this long"
    )
    bench.add_argument(
        "--prompt-reuse",
        action="store_true",
        help="instead: time to first token with and without the system prompt's KV cache",
    )
    bench.add_argument(
        "--threads-sweep",
        action="store_true",
        help="instead: decode and prefill speed at 1..N threads, with recommended settings",
    )
    bench.add_argument(
        "--telemetry-overhead",
        action="store_true",
        help="instead: decode speed with health every 1 s against telemetry off",
    )
    bench.add_argument(
        "--contention",
        action="store_true",
        help="instead: decode speed beside busy processes, OpenMP default against the unit's "
        "passive settings (model threads default to all logical CPUs)",
    )
    bench.add_argument(
        "--hogs", type=int, default=1, help="with --contention: busy processes during 'loaded'"
    )
    bench.add_argument(
        "--omp-variants",
        default="default,passive",
        help="with --contention: OpenMP settings to compare, comma-separated, from default, "
        "passive, spin-10k, spin-100k (GOMP_SPINCOUNT)",
    )
    bench.add_argument(
        "--cpu-quota",
        type=float,
        metavar="PERCENT",
        help="with --contention: run each daemon in its own new cgroup limited to PERCENT %% of "
        "one CPU (150: 1.5 cores), as systemd's CPUQuota=; needs root",
    )
    bench.add_argument(
        "--chunking",
        action="store_true",
        help="instead: messages per answer, first chunk and tok/s for each stream.flush_ms",
    )
    bench.add_argument(
        "--flush-ms",
        default="0,50,200",
        help="with --chunking: stream.flush_ms values, comma-separated",
    )
    bench.set_defaults(handler=_bench)
    return parser


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="read broker and prefix from this config")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default 1883)")
    parser.add_argument("--prefix", help="the kiosk's topic prefix (default kiosk/<hostname>)")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_or_report(path: Path | None) -> Config | None:
    if path is None:
        return Config()
    try:
        return load(path)
    except ConfigError as exc:
        if isinstance(exc.__cause__, PermissionError):
            print(_unreadable(path), file=sys.stderr)
            return None
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _unreadable(path: Path) -> str:
    """Why an operator cannot read the config (0640 root:kioskd when installed), and the ways in."""
    import grp  # noqa: PLC0415 - only for this message

    try:
        group = grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        group = "kioskd"
    return (
        f"cannot read {path}: permission denied; run with sudo, or add yourself to group "
        f"{group} (sudo usermod -aG {group} $USER, then log in again)"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        config = Config() if args.config is None else load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        from daemon.app import report_config_error  # noqa: PLC0415

        report_config_error(args.config, exc.problems)
        return exitcodes.CONFIG_ERROR
    from daemon.service import setup_logging  # noqa: PLC0415

    setup_logging(config.logging.level)
    # A watchdog kill (SIGABRT) then leaves every thread's traceback in the journal.
    faulthandler.enable()
    from daemon.app import App  # noqa: PLC0415 - keeps check-config and ask free of llama.cpp

    try:
        app = App(config)
    except ConfigError as exc:  # e.g. an unreadable password file
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    return app.run()


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.FAILURE
    print(f"{args.config}: OK (device {config.device_id}, topics under {config.topic_prefix}/)")
    return exitcodes.OK


def _target(args: argparse.Namespace) -> tuple[str, int, str] | None:
    """Broker host, port and kiosk prefix from --host/--port/--prefix, else --config."""
    config = _load_or_report(args.config)
    if config is None:
        return None
    host = args.host or config.mqtt.host
    port = args.port or config.mqtt.port
    if args.prefix:
        prefix = args.prefix
    elif args.config:
        prefix = config.topic_prefix
    else:
        prefix = f"kiosk/{sanitize_device_id(socket.gethostname())}"
    return host, port, prefix


def _status(args: argparse.Namespace) -> int:
    from daemon.asker import read_retained  # noqa: PLC0415
    from daemon.topics import Topics  # noqa: PLC0415

    target = _target(args)
    if target is None:
        return exitcodes.CONFIG_ERROR
    host, port, prefix = target
    topics = Topics(prefix)
    retained = read_retained(
        [topics.status, topics.health], host=host, port=port, timeout_s=args.timeout_s
    )
    if topics.health not in retained:
        status = retained.get(topics.status, b"unknown").decode("utf-8", "replace")
        print(f"{prefix}: no health message on {host}:{port} (status: {status})", file=sys.stderr)
        return exitcodes.FAILURE
    health = json.loads(retained[topics.health])
    if args.json:
        print(json.dumps(health, indent=2, ensure_ascii=False))
    else:
        status = retained.get(topics.status, b"unknown").decode("utf-8", "replace")
        print(render_health(prefix, status, health))
    return exitcodes.OK


def render_health(prefix: str, status: str, health: dict[str, Any]) -> str:
    """A kiosk's health as a short table for a terminal; null readings show as '-'."""

    def show(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    cpu, memory, thermal = health["cpu"], health["memory"], health["thermal"]
    throttled = thermal["throttled"]
    zones = ", ".join(f"{name} {show(temp, ' C')}" for name, temp in thermal["zones"].items())
    cores = " ".join(show(c) for c in cpu["per_core"] or [])
    load = " ".join(show(x) for x in cpu["load"] or [])
    model, queue, counters, last = (
        health["model"],
        health["queue"],
        health["counters"],
        health["last"],
    )
    rows = [
        (
            "Kiosk",
            f"{prefix} ({health['device']}): {status}, state {health['state']}, "
            f"up {health['uptime_s']} s",
        ),
        (
            "CPU",
            f"{show(cpu['percent'], ' %')} [{cores}], {show(cpu['freq_mhz'], ' MHz')}, "
            f"load {load or '-'}",
        ),
        (
            "Memory",
            f"{show(memory['available_mb'])} of {show(memory['total_mb'])} MiB free, "
            f"kioskd RSS {show(memory['rss_mb'], ' MiB')}",
        ),
        (
            "Thermal",
            f"CPU {show(thermal['cpu_c'], ' C')}; throttled now "
            f"{show(throttled['now'])}, since boot {show(throttled['since_boot'])} "
            f"{' '.join(throttled['flags'])}".rstrip(),
        ),
        ("Zones", zones or "-"),
        (
            "Model",
            f"{show(model['name'])}, {show(model['threads'])} threads, ctx {show(model['ctx'])}",
        ),
        ("Queue", f"{queue['depth']} waiting of {queue['capacity']}"),
        ("Counters", ", ".join(f"{k} {v}" for k, v in counters.items())),
        (
            "Last",
            f"{show(last['tokens_per_s'], ' tok/s')}, first token "
            f"{show(last['first_token_ms'], ' ms')}",
        ),
    ]
    return "\n".join(f"{name:<9} {text}" for name, text in rows)


def _ask(args: argparse.Namespace) -> int:
    from daemon.asker import Answer, ask  # noqa: PLC0415

    target = _target(args)
    if target is None:
        return exitcodes.CONFIG_ERROR
    host, port, prefix = target

    def show(message: dict[str, object]) -> None:
        if args.json:
            print(json.dumps(message, ensure_ascii=False), flush=True)
        elif message.get("type") == "chunk":
            print(message.get("text", ""), end="", flush=True)
        elif message.get("type") == "queued":
            print(f"[queued, position {message.get('position')}]", file=sys.stderr, flush=True)

    answer: Answer = ask(
        args.question,
        host=host,
        port=port,
        prefix=prefix,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        timeout_s=args.timeout_s,
        on_message=show,
    )
    if answer.final is None:
        print(
            f"\nno answer within {args.timeout_s:g} s from {prefix} on {host}:{port}",
            file=sys.stderr,
        )
        return 2
    if answer.final.get("type") == "error":
        print(f"error {answer.final.get('code')}: {answer.final.get('message')}", file=sys.stderr)
        return exitcodes.FAILURE
    if not args.json:
        print()
    return exitcodes.OK


def _bench(args: argparse.Namespace) -> int:
    from daemon.bench import run_bench  # noqa: PLC0415 - loads llama.cpp

    _setup_logging("WARNING")
    lengths = [int(n) for n in args.tokens.split(",")]
    if args.prompt_reuse or args.threads_sweep:
        return _bench_model(args)
    if args.contention or args.chunking:
        return _bench_load(args, max(lengths))
    if args.telemetry_overhead:
        from daemon.bench import run_telemetry_bench  # noqa: PLC0415

        telemetry = run_telemetry_bench(
            reps=args.reps,
            tokens=max(lengths),
            threads=args.threads,
            model=args.model,
            out_dir=args.out,
        )
        print(
            f"{telemetry['tokens']} tokens, {telemetry['reps']} reps: telemetry every 1 s "
            f"{telemetry['telemetry_1s_tokens_per_s_median']} tok/s, off "
            f"{telemetry['telemetry_off_tokens_per_s_median']} tok/s; drop "
            f"{telemetry['drop_percent_median_of_pairs']} % (median of paired runs)"
        )
        print(f"full results: {args.out / 'bench-telemetry.json'}")
        return exitcodes.OK
    result = run_bench(
        reps=args.reps,
        lengths=lengths,
        threads=args.threads,
        model=args.model,
        out_dir=args.out,
        idle_s=args.idle_s,
        vs_server=args.vs_server,
    )
    print(
        f"model {result['model']}, {result['threads']} threads, {result['reps']} reps; "
        f"kioskd RSS {result['kioskd_rss_mib']} MiB, "
        f"{result['kioskd_rss_after_longest_question_mib']} MiB after the longest question "
        f"(budget {result['rss_budget_mib']} MiB), "
        f"idle CPU {result['kioskd_idle_cpu_percent_of_one_core']} % of a core"
    )
    print(
        f"{'tokens':>6} {'raw tok/s':>10} {'kioskd tok/s':>13} {'ratio':>7} {'paired':>7} "
        f"{'overhead ms (median/p99)':>26} {'gap p99 ms raw/kioskd':>22}"
    )
    for length, row in result["summary"].items():
        print(
            f"{length:>6} {row['raw_decode_tokens_per_s']:>10} "
            f"{row['kioskd_decode_tokens_per_s']:>13} {row['ratio_kioskd_over_raw']:>7} "
            f"{row['ratio_median_of_pairs']:>7} "
            f"{row['first_chunk_overhead_ms_median']:>13} / "
            f"{row['first_chunk_overhead_ms_p99']:<10} "
            f"{row['raw_gap_p99_ms']:>10} / {row['kioskd_gap_p99_ms']}"
        )
    for length, row in result["summary"].items():
        if "server_decode_tokens_per_s" in row:
            print(
                f"{length:>6} llama_cpp.server + bridge: {row['server_decode_tokens_per_s']} "
                f"tok/s, first chunk {row['server_first_chunk_ms']} ms (kioskd "
                f"{row['kioskd_first_chunk_ms']} ms), gap p99 {row['server_gap_p99_ms']} ms; "
                f"kioskd/server {row['ratio_kioskd_over_server']} (paired "
                f"{row['ratio_kioskd_over_server_median_of_pairs']})"
            )
    pooled = result["first_chunk_all_lengths"]
    if pooled is not None:
        print(
            f"first chunk over all lengths ({pooled['samples_per_system']} answers each): kioskd "
            f"{pooled['kioskd_ms_median']} ms, server {pooled['server_ms_median']} ms, raw "
            f"{pooled['raw_ms_median']} ms; kioskd - server "
            f"{pooled['kioskd_minus_server_ms_median_of_pairs']} ms (median of pairs), kioskd "
            f"sooner in {pooled['kioskd_sooner_in_pairs']}"
        )
    if result["server_rss_mib"] is not None:
        print(
            f"llama_cpp.server RSS {result['server_rss_mib']} MiB, idle CPU "
            f"{result['server_idle_cpu_percent_of_one_core']} % of a core"
        )
    try:
        from daemon.bench_chart import render  # noqa: PLC0415

        print(f"chart: {render(result, args.out / 'bench.png')}")
    except ImportError:
        print("no chart: install the bench extra (pip install -e '.[bench]') for matplotlib")
    print(f"full results: {args.out / 'bench.json'}")
    return exitcodes.OK


def _bench_load(args: argparse.Namespace, tokens: int) -> int:
    # Imported here: these start daemons that load llama.cpp.
    from daemon import bench_cgroup, bench_contention, bench_load  # noqa: PLC0415

    if args.contention:
        try:
            variants = bench_contention.parse_variants(args.omp_variants)
        except ValueError as error:
            print(f"kioskd bench: {error}", file=sys.stderr)
            return exitcodes.FAILURE
        try:
            contention = bench_contention.run_contention_bench(
                reps=args.reps,
                tokens=tokens,
                threads=args.threads,
                hogs=args.hogs,
                model=args.model,
                out_dir=args.out,
                variants=variants,
                cpu_quota=args.cpu_quota,
            )
        except bench_cgroup.CgroupError as error:
            print(f"kioskd bench: {error}", file=sys.stderr)
            return exitcodes.FAILURE
        print(bench_contention.render_contention(contention))
        print(f"full results: {args.out / 'bench-contention.json'}")
    if args.chunking:
        chunking = bench_load.run_chunking_bench(
            reps=args.reps,
            tokens=tokens,
            threads=args.threads,
            flushes_ms=[float(ms) for ms in args.flush_ms.split(",")],
            model=args.model,
            out_dir=args.out,
        )
        print(bench_load.render_chunking(chunking))
        print(f"full results: {args.out / 'bench-chunking.json'}")
    return exitcodes.OK


def _bench_model(args: argparse.Namespace) -> int:
    from daemon.bench import write_result  # noqa: PLC0415
    from daemon.bench_model import run_prompt_reuse, run_threads_sweep  # noqa: PLC0415
    from daemon.config import default_threads  # noqa: PLC0415
    from daemon.models import resolve  # noqa: PLC0415

    model = resolve(args.model).path
    if args.prompt_reuse:
        reuse = run_prompt_reuse(
            reps=args.reps, threads=args.threads or default_threads(), model=model
        )
        write_result(reuse, args.out, "bench-prompt-reuse.json")
        print(
            f"system prompt {reuse['system_prompt_tokens']} tokens: first token "
            f"{reuse['first_token_ms_with_reuse_median']} ms with reuse, "
            f"{reuse['first_token_ms_without_reuse_median']} ms without "
            f"(-{reuse['reduction_percent']} %)"
        )
    if args.threads_sweep:
        sweep = run_threads_sweep(reps=args.reps, model=model, max_threads=args.threads)
        write_result(sweep, args.out, "bench-threads.json")
        for row in sweep["rows"]:
            print(
                f"{row['threads']:>2} threads: prefill {row['prefill_tokens_per_s']:>8} tok/s, "
                f"decode {row['decode_tokens_per_s']:>6} tok/s"
            )
        picks = sweep["recommended"]
        print(
            f"recommended: model.threads: {picks['model.threads']}, "
            f"model.threads_batch: {picks['model.threads_batch']}"
        )
    return exitcodes.OK


def _fetch_model(args: argparse.Namespace) -> int:
    from daemon.models import PRODUCTION, FetchError, fetch, models_dir  # noqa: PLC0415

    _setup_logging("INFO")
    config = _load_or_report(args.config)
    if config is None:
        return exitcodes.CONFIG_ERROR
    target_dir = args.dir or models_dir(config.model.dir)
    started = time.monotonic()
    try:
        path = fetch(PRODUCTION, target_dir, url=args.url)
    except FetchError as exc:
        print(f"fetch-model: {exc}", file=sys.stderr)
        return exitcodes.FAILURE
    print(
        f"{path} ready ({time.monotonic() - started:.1f} s); kioskd will use it when "
        "model.path is null"
    )
    return exitcodes.OK

"""`kioskd bench SUBCOMMAND`: the benchmarks of docs/benchmarks.md, one subcommand each.

Every benchmark module is imported inside its handler: they load llama.cpp and start daemons,
and the runtime never imports daemon.bench. The handlers print what daemon.bench.report makes
of the typed results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import exitcodes
from daemon.cli.service import console_logging

Handler = Callable[[argparse.Namespace], int]


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="measure kioskd (docs/benchmarks.md); `kioskd bench -h` lists the benchmarks"
    )
    modes = bench.add_subparsers(required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    common.add_argument("--out", type=Path, default=Path("bench-results"), help="output dir")
    model = argparse.ArgumentParser(add_help=False, parents=[common])
    model.add_argument("--model", help="GGUF file (default: as kioskd resolves it)")
    model.add_argument("--threads", type=int, help="model threads (default: as kioskd)")
    tokens = argparse.ArgumentParser(add_help=False)
    tokens.add_argument("--tokens", type=int, default=512, help="answer length (default 512)")
    idle = argparse.ArgumentParser(add_help=False)
    idle.add_argument("--idle-s", type=float, default=60.0, help="then measure idle CPU this long")

    def add(
        name: str, help_text: str, handler: Handler, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        parser = modes.add_parser(name, help=help_text, parents=list(parents or [model]))
        parser.set_defaults(handler=_quietly(handler))
        return parser

    lengths = argparse.ArgumentParser(add_help=False)
    lengths.add_argument("--tokens", default="64,512", help="answer lengths, comma-separated")
    add(
        "compare",
        "kioskd over MQTT against the raw llama-cpp-python loop, RSS, idle CPU",
        _compare,
        model,
        lengths,
        idle,
    )
    add(
        "server",
        "the same plus llama_cpp.server behind an MQTT bridge (llama-cpp-python[server])",
        _server,
        model,
        lengths,
        idle,
    )
    add(
        "threads",
        "prefill and decode speed at 1..--threads threads, recommended settings",
        _threads,
    )
    add(
        "prompt-reuse",
        "time to first token with and without the system prompt's KV cache",
        _prompt_reuse,
    )
    contention = add(
        "contention",
        "decode speed beside busy processes per OpenMP setting (threads default to all CPUs)",
        _contention,
        model,
        tokens,
    )
    contention.add_argument("--hogs", type=int, default=1, help="busy processes when 'loaded'")
    contention.add_argument(
        "--omp-variants",
        default="default,passive",
        help="OpenMP settings to compare, comma-separated, from default, passive, spin-10k, "
        "spin-100k (GOMP_SPINCOUNT)",
    )
    contention.add_argument(
        "--cpu-quota",
        type=float,
        metavar="PERCENT",
        help="run each daemon in its own new cgroup limited to PERCENT %% of one CPU (150: 1.5 "
        "cores), as systemd's CPUQuota=; needs root",
    )
    chunking = add(
        "chunking",
        "messages per answer, first chunk and tok/s per stream.flush_ms",
        _chunking,
        model,
        tokens,
    )
    chunking.add_argument(
        "--flush-ms", default="0,50,200", help="stream.flush_ms values, comma-separated"
    )
    add(
        "telemetry",
        "decode speed with health every 1 s against telemetry off",
        _telemetry,
        model,
        tokens,
    )
    grammar = add(
        "grammar",
        "JSON answers under a grammar against free decoding, per mode",
        _grammar,
        model,
        tokens,
    )
    grammar.add_argument("gguf", nargs="*", type=Path, help="more models to measure")
    add("answers", "answer lengths of the model on tests/data/factory-questions.txt", _answers)
    conversation = add(
        "conversation",
        "a saved conversation state against reading the history again; many conversations "
        "through one daemon",
        _conversation,
    )
    conversation.add_argument(
        "--conversations", type=int, default=200, help="conversations of 3 turns (0: skip)"
    )
    conversation.add_argument(
        "--max-state-mb", type=float, default=16.0, help="the daemon's conversations.max_state_mb"
    )
    fleet = add(
        "fleet", "questions per second of 1, 2, 3... kiosks sharing one fleet", _fleet, common
    )
    fleet.add_argument("--kiosks", default="1,2,3", help="fleet sizes, comma-separated")
    add(
        "web",
        "the touch page in headless Chromium: click to first text, kioskd web's RSS and idle CPU",
        _web,
        common,
        tokens,
        idle,
    )


def _quietly(handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        console_logging("WARNING")
        return handler(args)

    return run


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _print(report: str, result: object, out_dir: Path, name: str) -> int:
    """Write the result as out_dir/NAME (JSON), and print its report and where the file is."""
    from daemon.bench.results import write_result  # noqa: PLC0415

    path = write_result(result, out_dir, name)
    print(report)
    print(f"full results: {path}")
    return exitcodes.OK


def _failed(error: Exception) -> int:
    print(f"kioskd bench: {error}", file=sys.stderr)
    return exitcodes.FAILURE


def _compare(args: argparse.Namespace, *, vs_server: bool = False) -> int:
    from daemon.bench import compare, report  # noqa: PLC0415 - loads llama.cpp

    result = compare.run_compare(
        reps=args.reps,
        lengths=_numbers(args.tokens),
        threads=args.threads,
        model=args.model,
        idle_s=args.idle_s,
        vs_server=vs_server,
    )
    try:
        chart = f"chart: {report.chart(result, args.out / 'bench.png')}"
    except ImportError:
        chart = "no chart: install the bench extra (pip install -e '.[bench]') for matplotlib"
    return _print(f"{report.compare(result)}\n{chart}", result, args.out, "bench.json")


def _server(args: argparse.Namespace) -> int:
    return _compare(args, vs_server=True)


def _threads(args: argparse.Namespace) -> int:
    from daemon.bench import report, threads  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.harness import resolve_model  # noqa: PLC0415

    result = threads.run_threads(
        reps=args.reps, model=resolve_model(args.model), max_threads=args.threads
    )
    return _print(report.threads(result), result, args.out, "bench-threads.json")


def _prompt_reuse(args: argparse.Namespace) -> int:
    from daemon.bench import prompt_reuse, report  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.harness import resolve_model, resolve_threads  # noqa: PLC0415

    result = prompt_reuse.run_prompt_reuse(
        reps=args.reps,
        threads=resolve_threads(args.threads),
        model=resolve_model(args.model),
    )
    return _print(report.prompt_reuse(result), result, args.out, "bench-prompt-reuse.json")


def _contention(args: argparse.Namespace) -> int:
    from daemon.bench import contention, report  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.cgroup import CgroupError  # noqa: PLC0415

    try:
        result = contention.run_contention(
            reps=args.reps,
            tokens=args.tokens,
            threads=args.threads,
            hogs=args.hogs,
            model=args.model,
            variants=contention.parse_variants(args.omp_variants),
            cpu_quota=args.cpu_quota,
        )
    except (ValueError, CgroupError) as error:
        return _failed(error)
    return _print(report.contention(result), result, args.out, "bench-contention.json")


def _chunking(args: argparse.Namespace) -> int:
    from daemon.bench import chunking, report  # noqa: PLC0415 - loads llama.cpp

    result = chunking.run_chunking(
        reps=args.reps,
        tokens=args.tokens,
        threads=args.threads,
        flushes_ms=[float(ms) for ms in args.flush_ms.split(",")],
        model=args.model,
    )
    return _print(report.chunking(result), result, args.out, "bench-chunking.json")


def _telemetry(args: argparse.Namespace) -> int:
    from daemon.bench import report, telemetry  # noqa: PLC0415 - loads llama.cpp

    result = telemetry.run_telemetry(
        reps=args.reps, tokens=args.tokens, threads=args.threads, model=args.model
    )
    return _print(report.telemetry(result), result, args.out, "bench-telemetry.json")


def _grammar(args: argparse.Namespace) -> int:
    from daemon.bench import grammar, report  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.harness import resolve_model, resolve_threads  # noqa: PLC0415

    result = grammar.run_grammar(
        reps=args.reps,
        tokens=args.tokens,
        threads=resolve_threads(args.threads),
        models=[resolve_model(args.model), *args.gguf],
    )
    return _print(report.grammar(result), result, args.out, "bench-grammar.json")


def _answers(args: argparse.Namespace) -> int:
    from daemon.bench import answers, report  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.harness import resolve_model, resolve_threads  # noqa: PLC0415

    result = answers.run_answers(
        reps=args.reps,
        threads=resolve_threads(args.threads),
        model=resolve_model(args.model),
    )
    return _print(report.answers(result), result, args.out, "bench-answers.json")


def _conversation(args: argparse.Namespace) -> int:
    from daemon.bench import conversation, report  # noqa: PLC0415 - loads llama.cpp
    from daemon.bench.harness import resolve_model, resolve_threads  # noqa: PLC0415

    result = conversation.run_conversation(
        reps=args.reps,
        threads=resolve_threads(args.threads),
        model=resolve_model(args.model),
        conversations=args.conversations,
        max_state_mb=args.max_state_mb,
    )
    return _print(report.conversation(result), result, args.out, "bench-conversation.json")


def _fleet(args: argparse.Namespace) -> int:
    from daemon.bench import fleet, report  # noqa: PLC0415 - loads llama.cpp

    result = fleet.run_fleet(kiosks=_numbers(args.kiosks), reps=args.reps)
    return _print(report.fleet(result), result, args.out, "bench-fleet.json")


def _web(args: argparse.Namespace) -> int:
    from daemon.bench import report, web  # noqa: PLC0415 - loads llama.cpp

    try:
        result = web.run_web(reps=args.reps, tokens=args.tokens, idle_s=args.idle_s)
    except (RuntimeError, TimeoutError) as error:
        return _failed(error)
    return _print(report.web(result), result, args.out, "bench-web.json")

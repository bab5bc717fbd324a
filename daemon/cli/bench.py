"""`kioskd bench`: measure kioskd over MQTT against the raw llama-cpp-python loop
(docs/benchmarks.md).

Every benchmark module is imported inside its handler: they load llama.cpp and start daemons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daemon import exitcodes
from daemon.cli.service import console_logging


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="measure kioskd over MQTT against the raw llama-cpp-python loop"
    )
    bench.add_argument(
        "mode",
        nargs="*",
        help="grammar [GGUF ...], answers, or conversation (docs/benchmarks.md)",
    )
    bench.add_argument(
        "--conversations",
        type=int,
        default=200,
        help="with conversation: conversations of 3 turns through one daemon (0: skip)",
    )
    bench.add_argument(
        "--max-state-mb",
        type=float,
        default=16.0,
        help="with conversation: the daemon's conversations.max_state_mb",
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
    bench.add_argument(
        "--web",
        action="store_true",
        help="instead: the touch page in headless Chromium: click to first text minus the "
        "daemon's first token, and kioskd web's RSS and idle CPU",
    )
    bench.add_argument(
        "--fleet",
        action="store_true",
        help="instead: questions per second of 1, 2, 3... kiosks sharing one fleet (token-delay "
        "hook)",
    )
    bench.add_argument(
        "--kiosks", default="1,2,3", help="with --fleet: fleet sizes, comma-separated"
    )
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from daemon.bench.compare import run_bench  # noqa: PLC0415 - loads llama.cpp

    console_logging("WARNING")
    lengths = [int(n) for n in args.tokens.split(",")]
    if args.mode and args.mode[0] == "conversation":
        return _bench_conversation(args)
    if args.mode:
        from daemon.bench.grammar import main as bench_grammar  # noqa: PLC0415

        return bench_grammar(args, max(lengths))
    if args.fleet:
        from daemon.bench.fleet import main as bench_fleet  # noqa: PLC0415

        kiosks = [int(n) for n in args.kiosks.split(",")]
        return bench_fleet(kiosks=kiosks, reps=args.reps, out_dir=args.out)
    if args.web:
        from daemon.bench.web import main as bench_web  # noqa: PLC0415

        return bench_web(reps=args.reps, tokens=max(lengths), out_dir=args.out, idle_s=args.idle_s)
    if args.prompt_reuse or args.threads_sweep:
        return _bench_model(args)
    if args.contention or args.chunking:
        return _bench_load(args, max(lengths))
    if args.telemetry_overhead:
        from daemon.bench.compare import run_telemetry_bench  # noqa: PLC0415

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
        from daemon.bench.report import render  # noqa: PLC0415

        print(f"chart: {render(result, args.out / 'bench.png')}")
    except ImportError:
        print("no chart: install the bench extra (pip install -e '.[bench]') for matplotlib")
    print(f"full results: {args.out / 'bench.json'}")
    return exitcodes.OK


def _bench_load(args: argparse.Namespace, tokens: int) -> int:
    # Imported here: these start daemons that load llama.cpp.
    from daemon.bench import cgroup as bench_cgroup  # noqa: PLC0415
    from daemon.bench import chunking as bench_load  # noqa: PLC0415
    from daemon.bench import contention as bench_contention  # noqa: PLC0415

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


def _bench_conversation(args: argparse.Namespace) -> int:
    from daemon.bench import conversation as bench_conversation  # noqa: PLC0415 - loads llama.cpp
    from daemon.config import default_threads  # noqa: PLC0415
    from daemon.models import resolve  # noqa: PLC0415

    result = bench_conversation.main(
        reps=args.reps,
        threads=args.threads or default_threads(),
        model=resolve(args.model).path,
        out_dir=args.out,
        conversations=args.conversations,
        max_state_mb=args.max_state_mb,
    )
    print(bench_conversation.render(result))
    print(f"full results: {args.out / 'bench-conversation.json'}")
    return exitcodes.OK


def _bench_model(args: argparse.Namespace) -> int:
    from daemon.bench.compare import write_result  # noqa: PLC0415
    from daemon.bench.prompt_reuse import run_prompt_reuse, run_threads_sweep  # noqa: PLC0415
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

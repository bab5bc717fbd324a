"""Wiring and lifecycle: parts start in order, stop in reverse, one state at a time."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import select
import signal
import socket
import threading
import time
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from daemon import __version__, exitcodes
from daemon.broker import JSON, Connection, Delivery, Inbound, Will
from daemon.config import Config, ConfigError, config_warnings, from_dict, load
from daemon.conversations import ConversationStore, Saver
from daemon.discovery import discovery_messages
from daemon.engine import Engine, EngineSettings, ModelLoadError
from daemon.fleet import FleetMember
from daemon.framing import Example
from daemon.intake import Intake
from daemon.ledger import PacketLedger, RecentAnswers
from daemon.loglimit import LogLimiter
from daemon.messages import Error, ErrorCode
from daemon.models import EmbeddedModelError, resolve
from daemon.monitor import Monitor, Snapshot
from daemon.reload import plan_reload, replace_live
from daemon.scheduler import Scheduler
from daemon.service import Notifier, Watchdog, WorkerProgress, setup_logging
from daemon.statefile import Identity, StateFiles, default_dir
from daemon.telemetry import TelemetryReader
from daemon.testhooks import TestHooks
from daemon.thermal import ThermalDecision, ThermalGovernor
from daemon.topics import Topics, homeassistant_status
from daemon.turns import Turns
from daemon.validation import parse_cancel, parse_forget

log = logging.getLogger(__name__)

# How long shutdown waits for the broker to acknowledge the last messages.
_FLUSH_TIMEOUT_S = 2.0

_WAKE_UP = 0  # not a signal: wakes the signal loop for request_stop()
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# Every signal whose default action would end kioskd without a word: SIGHUP and SIGUSR1 have
# jobs, the rest are logged and ignored. Faults (SIGSEGV, SIGABRT, ...) stay with faulthandler;
# SIGPIPE is ignored by Python already.
_HANDLED_SIGNALS = (
    *_STOP_SIGNALS,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


class State(StrEnum):
    """Lifecycle states, as shown in P/health and systemd's STATUS=."""

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    THROTTLED = "throttled"
    DRAINING = "draining"


class App:
    """One kiosk: broker connection, model, scheduler."""

    def __init__(
        self, config: Config, hooks: TestHooks | None = None, config_path: Path | None = None
    ) -> None:
        """`config_path` is the file SIGHUP reloads; None: SIGHUP only logs."""
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self._hooks = hooks if hooks is not None else TestHooks.from_env()
        self._lifecycle = State.STARTING
        self._stop = threading.Event()
        self._engine: Engine | None = None
        self._model_name: str | None = None
        self._throttled = False
        self._config_path = config_path
        # Python runs signal handlers only when the main thread executes bytecode, and a main
        # thread blocked on a lock may never see a signal that another thread received. The C
        # handler writes each signal's number to this socket instead (signal.set_wakeup_fd),
        # and the main loop waits on it with select().
        self._signal_inbox, self._signal_outbox = socket.socketpair()
        self._signal_outbox.setblocking(False)
        self._log = LogLimiter(log)
        conversations = config.conversations
        self.conversations = ConversationStore(
            ttl_s=conversations.ttl_s,
            max_active=conversations.max_active,
            max_state_bytes=int(conversations.max_state_mb * 2**20),
        )
        self._saver = Saver(self.conversations, ttl_s=conversations.ttl_s)
        self.scheduler = Scheduler(
            capacity=config.queue.capacity,
            flush_ms=config.stream.flush_ms,
            max_chunk_chars=config.stream.max_chunk_chars,
            on_busy_change=self._on_busy_change,
            next_turn=self.conversations.next_turn,
        )
        self.notifier = Notifier()
        self.watchdog = Watchdog(
            self.notifier, stall_s=config.watchdog.stall_s, progress=self._worker_progress
        )
        telemetry, thermal = config.telemetry, config.thermal
        self.monitor = Monitor(
            device=config.device_id,
            interval_s=telemetry.interval_s,
            reader=TelemetryReader(Path(telemetry.sys_root), telemetry.vcgencmd),
            governor=ThermalGovernor(
                thermal.soft_limit_c, thermal.hard_limit_c, thermal.resume_below_c, config.threads
            ),
            snapshot=self._snapshot,
            on_decision=self._apply_thermal,
            publish=self._publish_health,
        )
        self._ha_status = homeassistant_status(config.homeassistant.prefix)
        subscriptions = [self.topics.ask, self.topics.cancel, self.topics.forget]
        if config.homeassistant.enabled:
            subscriptions.append(self._ha_status)
        self.connection = self._connection(
            client_id=config.client_id,
            session_expiry_s=config.mqtt.session_expiry_s,
            will=Will(self.topics.status, b"offline"),
            subscriptions=subscriptions,
            on_message=self._on_message,
            on_connected=self._on_connected,
            on_problem=self._on_broker_problem,
        )
        self.answers = RecentAnswers(
            dedup_s=config.limits.dedup_s, max_ids=config.limits.dedup_max_ids
        )
        self.packets = PacketLedger(max_ids=config.limits.dedup_max_ids)
        self.intake = Intake(
            config,
            self.topics,
            self.scheduler,
            self.connection,
            packets=self.packets,
            answers=self.answers,
            device=config.device_id,
        )
        self.fleet = (
            FleetMember(
                config,
                self.scheduler,
                self.answers,
                self._connection,
                forget=self.conversations.forget,
            )
            if config.fleet.prefix is not None
            else None
        )

    def _connection(self, **settings: Any) -> Connection:
        """A connection to the configured broker; `settings` say whose and what for."""
        mqtt = self.config.mqtt
        return Connection(
            host=mqtt.host,
            port=mqtt.port,
            protocol=mqtt.protocol,
            keepalive_s=mqtt.keepalive_s,
            reconnect_min_s=mqtt.reconnect_min_s,
            reconnect_max_s=mqtt.reconnect_max_s,
            username=mqtt.username,
            password=self.config.mqtt_password(),
            tls_context=mqtt.tls.ssl_context(),
            # docs/protocol.md "Crash safety": a question is acknowledged once it is answered.
            manual_ack=True,
            max_packet_bytes=mqtt.max_message_bytes,
            **settings,
        )

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._lifecycle is not State.READY:
            return self._lifecycle
        if self._throttled:
            return State.THROTTLED
        return State.BUSY if self.scheduler.busy else State.READY

    def _enter(self, state: State) -> None:
        if state is not self._lifecycle:
            log.info("state: %s -> %s", self._lifecycle, state)
            self._lifecycle = state
            self._report_health()
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """One human line for systemd's STATUS=: "ready: qwen2.5-0.5b, 3 threads, 54 C"."""
        telemetry = self.monitor.last_telemetry
        cpu_c = telemetry.thermal.cpu_c if telemetry is not None else None
        temp = "temperature unknown" if cpu_c is None else f"{cpu_c:.0f} C"
        model = self._model_name or "model not loaded"
        line = f"{self.state}: {model}, {self.monitor_threads()} threads, {temp}"
        problem = self.connection.problem
        return line if problem is None else f"{line}; broker: {problem}"

    def _worker_progress(self) -> WorkerProgress:
        return WorkerProgress(self.scheduler.busy, self.scheduler.last_progress_monotonic)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._install_signal_handlers()
        try:
            return self._start_and_wait()
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # full: the loop is awake already
            self._signal_outbox.send(bytes([_WAKE_UP]))

    def _start_and_wait(self) -> int:
        log.info(
            "kioskd starting: device %s, topics under %s/, broker %s:%s (MQTT %s)",
            self.config.device_id,
            self.topics.prefix,
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.config.mqtt.protocol,
        )
        for warning in config_warnings(self.config):
            log.warning("config: %s", warning)
        # Connect first, so questions sent while the model loads are queued, not lost.
        self.connection.start()
        if self.fleet is not None:
            self.fleet.start()  # joins the share only once it can answer
        self.monitor.start()
        self._enter(State.LOADING)
        try:
            self._engine = self._load_engine()
        except (ModelLoadError, EmbeddedModelError) as exc:
            log.error("%s", exc)
            self._report_fatal(ErrorCode.MODEL_ERROR, str(exc))
            return exitcodes.MODEL_UNAVAILABLE
        if self._stop.is_set():
            return exitcodes.OK
        # The governor may already have stepped down while the model was loading.
        self._engine.set_threads(self.monitor_threads())
        self._load_conversations(self._engine)
        self.scheduler.start(self._turns(self._engine))
        self._enter(State.READY)
        if self.fleet is not None and not self.scheduler.overheated:
            # docs/protocol.md: online only once every subscription, the share too, is acknowledged.
            self.fleet.join()
        self._announce_online()
        if self.config.homeassistant.enabled:
            self._publish_discovery()  # now with the model's name
        self.notifier.ready(self.status_line())
        self.watchdog.start()
        self._serve_signals()
        return exitcodes.OK

    def _serve_signals(self) -> None:
        """Until stopped: act on the signals the handler queued (it runs between bytecodes of
        this thread, so it only queues; a reload here cannot interrupt itself)."""
        while not self._stop.is_set():
            select.select([self._signal_inbox], [], [])
            for signum in self._signal_inbox.recv(256):
                if signum != _WAKE_UP:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        try:
            if signum in _STOP_SIGNALS:
                log.info("received %s; stopping", name)
                self._stop.set()
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP; reloading the configuration")
                self._reload()
            elif signum == signal.SIGUSR1:
                log.info("state: %s", self.state_dump())
            else:
                self._log.log(
                    logging.WARNING,
                    f"signal {name}",
                    "received %s; ignored (SIGHUP reloads the configuration, SIGUSR1 logs the "
                    "state, SIGTERM stops)",
                    name,
                )
        except Exception:
            log.exception("handling %s failed; kioskd goes on", name)

    def state_dump(self) -> str:
        """One line for SIGUSR1: what kioskd is doing and holding."""
        counters = self.scheduler.counters
        telemetry = self.monitor.last_telemetry
        cpu_c = telemetry.thermal.cpu_c if telemetry is not None else None
        held = self.packets.held + (self.fleet.packets.held if self.fleet else 0)
        return (
            f"{self.state}; running {self.scheduler.running_id or '-'}, queue "
            f"{self.scheduler.depth}/{self.scheduler.capacity}, conversations "
            f"{self.conversations.active} ({self.conversations.state_bytes / 2**20:.1f} MiB of "
            f"state), unacknowledged questions "
            f"{held}; broker {'connected' if self.connection.connected else 'away'}"
            f"{'' if self.connection.problem is None else f' ({self.connection.problem})'}; "
            f"model {self._model_name or '-'}, threads {self.monitor_threads()}, CPU "
            f"{'-' if cpu_c is None else f'{cpu_c:.1f} C'}; answered {counters.answered}, "
            f"errors {counters.errors}, rejected {counters.rejected}, cancelled "
            f"{counters.cancelled}"
        )

    def _reload(self) -> None:
        if self._config_path is None:
            log.warning("no config file to reload (started with the built-in defaults)")
            return
        try:
            new = load(self._config_path)
        except ConfigError as exc:
            log.error(
                "reload refused, keeping the running configuration: %s", "; ".join(exc.problems)
            )
            return
        plan = plan_reload(self.config, new)
        for key in plan.restart_keys:
            log.warning("reload: %s changed; it takes effect only after a restart", key)
        self._apply(new)
        self.config = replace_live(self.config, new)
        log.info(
            "reload: applied %s",
            ", ".join(plan.live_keys) if plan.live_keys else "nothing (no live key changed)",
        )

    def _apply(self, new: Config) -> None:
        """Put the keys that can change while running into effect."""
        setup_logging(new.logging.level)
        self.monitor.set_interval(new.telemetry.interval_s)
        thermal = new.thermal
        self.monitor.set_limits(thermal.soft_limit_c, thermal.hard_limit_c, thermal.resume_below_c)
        self.intake.reconfigure(new)
        if self.fleet is not None:
            self.fleet.intake.reconfigure(new)
        self.scheduler.set_capacity(new.queue.capacity)
        self.answers.set_dedup_s(new.limits.dedup_s)

    def _load_engine(self) -> Engine:
        model = self.config.model
        resolved = resolve(model.path, model.dir)
        log.info("using the %s model %s", resolved.source, resolved.path)
        self._model_name = resolved.path.stem.lower()
        engine = Engine(
            EngineSettings(
                path=resolved.path,
                threads=self.config.threads,
                threads_batch=self.config.threads_batch,
                ctx=model.ctx,
                max_tokens=model.max_tokens,
                temperature=model.temperature,
                system_prompt=model.system_prompt,
                chat_format=model.chat_format,
                seed=model.seed,
                batch_tokens=model.batch_tokens,
                mmap=model.mmap,
                prompt_style=model.prompt_style,
                examples=tuple(Example(e["question"], e["answer"]) for e in model.examples),
                stop=tuple(model.stop),
                repeat_penalty=model.repeat_penalty,
                gpu_layers=model.gpu_layers,
            ),
            self._hooks,
        )
        started = time.monotonic()
        warm = engine.warm_up()
        log.info(
            "model warm: %d prompt tokens, warm-up took %d ms",
            warm.prompt_tokens,
            round((time.monotonic() - started) * 1000),
        )
        return engine

    def _load_conversations(self, engine: Engine) -> None:
        """Take in the conversations saved before a restart, and start saving them."""
        settings = self.config.conversations
        if settings.persist:
            files = StateFiles(
                default_dir(settings.dir),
                Identity.of(
                    model_path=engine.settings.path,
                    ctx=engine.settings.ctx,
                    template=engine.template_source,
                    system_prompt=engine.settings.system_prompt,
                    llama=llama_version(),
                ),
            )
            loaded = self.conversations.load(files)
            log.info("conversations: %d taken in from %s", loaded, files.directory)
        self._saver.start()

    def _turns(self, engine: Engine) -> Turns:
        settings = self.config.conversations
        model = self.config.model
        return Turns(
            engine,
            self.conversations,
            budget_tokens=settings.max_context_tokens or model.ctx - model.max_tokens,
            keep_state=settings.max_state_mb > 0,
        )

    def _on_busy_change(self) -> None:
        # Health shows busy even when no interval tick falls inside a short answer.
        self.monitor.report_soon()
        if not self.scheduler.busy and self.scheduler.depth == 0:
            self._saver.idle()

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.watchdog.stop()
        if self.fleet is not None:
            self.fleet.leave("stopping")  # later fleet questions go to the others
        self._enter(State.DRAINING)
        worker_stopped = self.scheduler.drain(self.config.shutdown.grace_s)
        if worker_stopped:
            self._saver.stop()  # after the last turn ended: it is saved too
        self.monitor.stop()
        offline = self.connection.publish(self.topics.status, b"offline", retain=True)
        if self.connection.connected:
            offline.wait(_FLUSH_TIMEOUT_S)
        self.connection.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self._engine is not None:
            if worker_stopped:
                self._engine.close()
            else:
                # Freeing the model under a generation that may still be inside llama.cpp could
                # crash the exit; the process's end frees it instead.
                log.warning("exiting without freeing the model: the generation thread is hung")
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        self._signal_inbox.close()
        self._signal_outbox.close()
        log.info("kioskd stopped")

    def _report_fatal(self, code: ErrorCode, message: str) -> None:
        """Tell clients why we are not coming up, when the broker is reachable."""
        if self.connection.wait_connected(_FLUSH_TIMEOUT_S):
            payload = Error(code, message).to_payload(None, 0, device=self.config.device_id)
            self.connection.publish(self.topics.error, payload).wait(_FLUSH_TIMEOUT_S)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests may run the app in a thread; they call request_stop() instead

        def handle(signum: int, _frame: FrameType | None) -> None:
            # The work is done by _serve_signals, which reads the number from the wakeup
            # socket. A stop is also flagged here for a model load, which does not serve
            # signals; the main thread never waits on this event, so this cannot deadlock.
            if signum in _STOP_SIGNALS:
                self._stop.set()

        signal.set_wakeup_fd(self._signal_outbox.fileno(), warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, handle)

    # --- health and thermal (monitor thread) ------------------------------------------------

    def monitor_threads(self) -> int:
        decision = self.monitor.last_decision
        return decision.threads if decision is not None else self.config.threads

    def _apply_thermal(self, decision: ThermalDecision) -> None:
        self._throttled = decision.throttled
        self.notifier.status(f"{self.status_line()} ({decision.reason})")
        if self._engine is not None:
            self._engine.set_threads(decision.threads)
        # The governor looks again every interval; two intervals is a fair first retry.
        retry_after_s = round(max(5.0, 2 * self.config.telemetry.interval_s), 1)
        self.scheduler.set_overheated(retry_after_s if decision.overheated else None)
        if self.fleet is not None and self._lifecycle is State.READY:
            if decision.overheated:
                self.fleet.leave(decision.reason)
            else:
                self.fleet.join()

    def _snapshot(self) -> Snapshot:
        counters = self.scheduler.counters
        return Snapshot(
            state=str(self.state),
            model={
                "name": self._model_name,
                "threads": self.monitor_threads(),
                "ctx": self.config.model.ctx,
            },
            queue={"depth": self.scheduler.depth, "capacity": self.scheduler.capacity},
            counters={
                "answered": counters.answered,
                "errors": counters.errors,
                "rejected": counters.rejected,
                "cancelled": counters.cancelled,
            },
            last={
                "tokens_per_s": _round(counters.last_tokens_per_s),
                "first_token_ms": _round(counters.last_first_token_ms),
            },
            conversations={
                "active": self.conversations.active,
                "state_mb": round(self.conversations.state_bytes / 2**20, 1),
            },
            fleet=None
            if self.fleet is None
            else {
                "prefix": self.fleet.topics.prefix,
                "group": self.fleet.group,
                "member": self.fleet.member,
            },
        )

    def _publish_health(self, payload: bytes) -> None:
        # QoS 0 and retained (docs/protocol.md): a lost one is replaced by the next.
        self.connection.publish(self.topics.health, payload, qos=0, retain=True, content_type=JSON)

    def _report_health(self) -> None:
        try:
            self.monitor.report()
        except Exception:
            log.exception("health report failed")

    def _publish_discovery(self) -> None:
        for topic, config in discovery_messages(
            device_id=self.config.device_id,
            ha_prefix=self.config.homeassistant.prefix,
            health_topic=self.topics.health,
            status_topic=self.topics.status,
            interval_s=self.config.telemetry.interval_s,
            model_name=self._model_name or "kioskd",
            sw_version=__version__,
        ):
            self.connection.publish(
                topic, json.dumps(config).encode("utf-8"), retain=True, content_type=JSON
            )
        log.info("published Home Assistant discovery under %s/", self.config.homeassistant.prefix)

    # --- broker callbacks (network thread) ---------------------------------------------------

    def _announce_online(self) -> Delivery:
        return self.connection.publish(self.topics.status, b"online", retain=True)

    def _on_broker_problem(self, _problem: str | None) -> None:
        self.notifier.status(self.status_line())

    def _on_connected(self) -> None:
        # A broker that restarted without persistence has lost our retained status.
        if self._lifecycle is State.READY:
            self._announce_online()
            # Before the model is loaded, discovery waits: it names the model (start-up sends it).
            if self.config.homeassistant.enabled:
                self._publish_discovery()

    def _on_message(self, message: Inbound) -> None:
        self.intake.dispatch(message, self._on_other_message)

    def _on_other_message(self, message: Inbound) -> None:
        if message.topic == self._ha_status and self.config.homeassistant.enabled:
            if message.payload.strip() == b"online":
                log.info("Home Assistant restarted; sending discovery again")
                self._publish_discovery()
        elif message.topic in (self.topics.cancel, self.topics.forget) and message.retain:
            # A retained cancel or forget would act again at every (re)subscribe.
            log.warning(
                "ignored a retained message on %s; clear it with an empty retained publish",
                message.topic,
            )
        elif message.topic == self.topics.cancel:
            self._on_cancel(message)
        elif message.topic == self.topics.forget:
            self._on_forget(message)

    def _on_cancel(self, message: Inbound) -> None:
        request_id = parse_cancel(message.payload)
        if request_id is None:
            self._log.log(logging.WARNING, "bad_cancel", "ignored a cancel without a valid id")
        elif not self.scheduler.cancel(request_id):
            self._log.log(
                logging.INFO,
                "unknown_cancel",
                "cancel for unknown request %s ignored",
                request_id,
                extra={"request_id": request_id},
            )

    def _on_forget(self, message: Inbound) -> None:
        conversation_id = parse_forget(message.payload)
        if conversation_id is None:
            self._log.log(
                logging.WARNING, "bad_forget", "ignored a forget without a valid conversation_id"
            )
        elif self.conversations.forget(conversation_id):
            log.info("conversation %s forgotten", conversation_id)
        else:
            self._log.log(
                logging.INFO,
                "unknown_forget",
                "forget for unknown conversation %s ignored",
                conversation_id,
            )


def llama_version() -> str:
    """The llama.cpp bindings' version (a saved model state is only read by the same one)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def report_config_error(config_path: Path, problems: list[str]) -> None:
    """Tell clients why this kiosk is not coming up, if the file's mqtt section is usable.

    Connects under a separate client id, so the daemon's persistent session (and the questions
    queued in it) is left alone.
    """
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        mqtt = raw.get("mqtt") if isinstance(raw, dict) else None
        config = from_dict({"mqtt": mqtt or {}})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return  # without a valid broker address there is no one to tell
    topics = Topics(config.topic_prefix)
    try:
        connection = Connection(
            host=config.mqtt.host,
            port=config.mqtt.port,
            client_id=f"{config.client_id}-config-error",
            protocol=config.mqtt.protocol,
            username=config.mqtt.username,
            password=config.mqtt_password(),
            tls_context=config.mqtt.tls.ssl_context(),
        )
    except ConfigError:
        return
    connection.start()
    try:
        if not connection.wait_connected(_FLUSH_TIMEOUT_S):
            return
        message = "kioskd cannot start: invalid configuration: " + "; ".join(problems)
        payload = Error(ErrorCode.INTERNAL, message).to_payload(None, 0, device=config.device_id)
        connection.publish(topics.error, payload).wait(_FLUSH_TIMEOUT_S)
        connection.publish(topics.status, b"offline", retain=True).wait(_FLUSH_TIMEOUT_S)
    finally:
        connection.stop()

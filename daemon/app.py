"""Wiring and lifecycle: parts start in order, stop in reverse, one state at a time."""

from __future__ import annotations

import json
import logging
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes
from daemon.broker import Connection
from daemon.brokeracks import Delivery
from daemon.config import Config, config_warnings
from daemon.control import Controls
from daemon.conversations import ConversationStore, Saver
from daemon.discovery import discovery_messages
from daemon.engine import Engine, ModelLoadError
from daemon.fleet import FleetMember
from daemon.intake import Intake
from daemon.ledger import PacketLedger, RecentAnswers
from daemon.loading import conversation_turns, load_engine, restore_conversations
from daemon.messages import ErrorCode
from daemon.models import EmbeddedModelError, resolve
from daemon.monitor import Monitor, Snapshot
from daemon.packets import JSON, Inbound, Will
from daemon.reload import reload
from daemon.scheduler import Scheduler
from daemon.selfreport import health_snapshot, state_line
from daemon.service import Notifier, Watchdog, WorkerProgress, setup_logging
from daemon.signals import SignalLoop
from daemon.startfailure import FLUSH_TIMEOUT_S, report_fatal
from daemon.telemetry import TelemetryReader
from daemon.testhooks import TestHooks
from daemon.thermal import ThermalDecision, ThermalGovernor
from daemon.topics import Topics, homeassistant_status

log = logging.getLogger(__name__)


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
        self._signals = SignalLoop(self._stop, reload=self._reload, state_dump=self.state_dump)
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
        self.controls = Controls(
            self.topics, cancel=self.scheduler.cancel, forget=self.conversations.forget
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
        self._signals.install()
        try:
            return self._start_and_wait()
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()
        self._signals.wake()

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
            report_fatal(
                self.connection, self.topics, self.config.device_id, ErrorCode.MODEL_ERROR, str(exc)
            )
            return exitcodes.MODEL_UNAVAILABLE
        if self._stop.is_set():
            return exitcodes.OK
        # The governor may already have stepped down while the model was loading.
        self._engine.set_threads(self.monitor_threads())
        self._load_conversations(self._engine)
        self.scheduler.start(conversation_turns(self.config, self._engine, self.conversations))
        self._enter(State.READY)
        if self.fleet is not None and not self.scheduler.overheated:
            # docs/protocol.md: online only once every subscription, the share too, is acknowledged.
            self.fleet.join()
        self._announce_online()
        if self.config.homeassistant.enabled:
            self._publish_discovery()  # now with the model's name
        self.notifier.ready(self.status_line())
        self.watchdog.start()
        self._signals.serve()
        return exitcodes.OK

    def state_dump(self) -> str:
        """One line for SIGUSR1: what kioskd is doing and holding."""
        telemetry = self.monitor.last_telemetry
        return state_line(
            self.state,
            scheduler=self.scheduler,
            conversations=self.conversations,
            connection=self.connection,
            held=self.packets.held + (self.fleet.packets.held if self.fleet else 0),
            model_name=self._model_name,
            threads=self.monitor_threads(),
            cpu_c=telemetry.thermal.cpu_c if telemetry is not None else None,
        )

    def _reload(self) -> None:
        self.config = reload(self._config_path, self.config, self._apply)

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
        return load_engine(self.config, resolved.path, self._hooks)

    def _load_conversations(self, engine: Engine) -> None:
        """Take in the conversations saved before a restart, and start saving them."""
        restore_conversations(self.config, engine, self.conversations)
        self._saver.start()

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
            offline.wait(FLUSH_TIMEOUT_S)
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
        self._signals.close()
        log.info("kioskd stopped")

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
        return health_snapshot(
            str(self.state),
            model_name=self._model_name,
            threads=self.monitor_threads(),
            ctx=self.config.model.ctx,
            scheduler=self.scheduler,
            conversations=self.conversations,
            fleet=self.fleet,
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
        else:
            self.controls.dispatch(message)

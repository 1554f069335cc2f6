"""Verdict dispatch to the line: a JSON line on stdout, a webhook (HTTP POST, retried) and MQTT (QoS 1).

Each message is the audit record (with its id), so a receiver can tell a repeat from a new verdict.
Webhooks and MQTT publish each from its own background thread with a bounded queue: scoring never waits on
the network, one target that is down or slow holds up no other, and a message that cannot be delivered after its
retries (or is pushed out of a full queue) is counted and reported.
"""

from __future__ import annotations

import io
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from defectscope.errors import InputError, SettingsError
from defectscope.clock import now
from defectscope.names import MQTT_TOPIC

if TYPE_CHECKING:
    from defectscope.line.drift import Drift

Message = dict[str, Any]
QUEUE_LIMIT = 10_000  # messages waiting for one target at most; beyond it the oldest are dropped and counted


def _text(message: Message) -> str:
    return json.dumps(message, sort_keys=True, allow_nan=False, default=str)


@dataclass
class JsonLines:
    """One JSON line per verdict on a text stream (stdout by default), flushed at once. Once its reader is gone (a
    closed pipe) every message is a miss, as a network target's that is down, and the stream is pointed at the null
    device so that what is left in its buffer cannot fail again when the process ends."""

    stream: TextIO = field(default_factory=lambda: sys.stdout)
    name: str = "json lines"
    closed: bool = field(default=False, init=False)

    def send(self, message: Message) -> None:
        if not self.closed:
            try:
                self.stream.write(_text(message) + "\n")
                self.stream.flush()
                return
            except BrokenPipeError:
                self.closed = True
                self._discard()
        raise BrokenPipeError("the reader of the JSON lines closed its end; they are journaled and sent again at the "
                              "next start")

    def _discard(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):  # a stream of no file (a test's)
            pass


class Webhook:
    """POST each verdict as JSON to a URL; a failed POST (a network error, or any status but 2xx: a redirect is not
    followed, since the receiver did not take the message) is retried `retries` times with doubling waits from
    `backoff` seconds."""

    def __init__(self, url: str, retries: int = 3, backoff: float = 0.5, timeout: float = 5.0) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise SettingsError(f"--webhook must be an http(s) URL, got {url!r:.80}")
        import httpx

        self.url, self.retries, self.backoff = url, retries, backoff
        self.name = f"webhook {url}"
        self.client = httpx.Client(timeout=timeout)

    def send(self, message: Message) -> None:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url, content=_text(message),
                                            headers={"content-type": "application/json"})
                if 200 <= response.status_code < 300:
                    return
                moved = response.headers.get("location") if response.is_redirect else None
                reason = f"HTTP {response.status_code}" + (f", redirected to {moved:.200}: give that URL" if moved else "")
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ConnectionError(f"webhook {self.url} refused the verdict after {self.retries + 1} tries ({reason})")

    def close(self) -> None:
        self.client.close()


def broker_address(address: str) -> tuple[str, int]:
    """(host, port) of --mqtt HOST, HOST:PORT or [IPv6]:PORT (port 1883 unless given, 1 to 65535)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = "1883" if not rest else rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 one
        host, port = address, "1883"
    if not host or "/" in host or any(c.isspace() for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"--mqtt must be HOST or HOST:PORT (a port of 1 to 65535, no scheme), got {address!r:.80}")
    return host, int(port)


class Mqtt:
    """Publish each verdict to an MQTT broker (paho-mqtt, QoS 1: the broker acknowledges every message); `retain`:
    the broker keeps the last message for subscribers that come later (a state, such as the drift check's)."""

    def __init__(self, address: str, topic: str = MQTT_TOPIC, timeout: float = 5.0,
                 retain: bool = False) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise SettingsError("MQTT dispatch needs paho-mqtt: pip install 'defectscope[line]'") from exc
        host, port = broker_address(address)
        check_topic(topic)
        self.topic, self.timeout, self.retain = topic, timeout, retain
        self.name = f"MQTT broker {host}:{port} ({topic})"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
        try:
            self.client.connect(host, int(port), keepalive=30)
        except (OSError, ValueError) as exc:  # ValueError: a name no resolver takes (an empty or too long label)
            raise InputError(f"cannot reach the MQTT broker at {host:.80}:{port}: {exc}") from exc
        self.client.loop_start()

    def send(self, message: Message) -> None:
        info = self.client.publish(self.topic, _text(message), qos=1, retain=self.retain)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise ConnectionError(f"the MQTT broker did not acknowledge a message within {self.timeout:g} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DriftNotice:
    """The drift check's answer when it turns (`HotFolder.on_drift`), published retained on TOPIC/drift: a subscriber
    that connects later still gets the line's current state. A broker that does not take it is reported, never fatal."""

    def __init__(self, address: str, topic: str, model: Message, report: Callable[[str], None]) -> None:
        self.target, self.model, self.report = Mqtt(address, f"{topic}/drift", retain=True), model, report

    def __call__(self, found: Drift) -> None:
        try:
            self.target.send({**self.model, "time": now(), **found.to_dict()})
        except (ConnectionError, OSError, ValueError) as exc:
            self.report(f"the drift check's answer did not reach {self.target.name}: {exc}")

    def close(self) -> None:
        self.target.close()


class _Delivery:
    """One verdict on its way to the network targets: done once each of them has it; after a miss, `on_partial` hears
    which targets did take it."""

    def __init__(self, message: Message, targets: int, on_sent: Callable[[], None] | None,
                 on_partial: Callable[[list[str]], None] | None) -> None:
        self.message, self.waiting, self.failed, self.took = message, targets, False, []
        self.on_sent, self.on_partial = on_sent, on_partial
        self._lock = threading.Lock()

    def settle(self, target: str, delivered: bool) -> tuple[bool, bool]:
        """Count one target's outcome: (the message's first failure, every target has settled)."""
        with self._lock:
            self.waiting -= 1
            first_failure = not delivered and not self.failed
            self.failed |= not delivered
            if delivered:
                self.took.append(target)
            return first_failure, self.waiting == 0


class _Lane:
    """One network target's bounded queue and the thread that sends from it: a slow or dead target holds up no other."""

    def __init__(self, target: Any, settle: Callable[[_Delivery, str, Exception | None], None]) -> None:
        self.target, self.settle = target, settle
        self.name = getattr(target, "name", type(target).__name__)
        self.queue: queue.Queue[_Delivery | None] = queue.Queue(QUEUE_LIMIT)
        self.thread = threading.Thread(target=self._run, name="defectscope-dispatch", daemon=True)
        self.thread.start()

    def put(self, delivery: _Delivery) -> list[_Delivery]:
        """Queue a delivery; when the queue is full the oldest waiting ones make room and are returned."""
        dropped = []
        while True:
            try:
                self.queue.put_nowait(delivery)
                return dropped
            except queue.Full:
                try:
                    dropped.append(self.queue.get_nowait())
                    self.queue.task_done()
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while (delivery := self.queue.get()) is not None:
            error = None
            try:
                self.target.send(delivery.message)
            except Exception as exc:  # noqa: BLE001 - a failed delivery is counted and reported, scoring goes on
                error = exc
            try:
                self.settle(delivery, self.name, error)
            finally:
                self.queue.task_done()


class Dispatcher:
    """Sends every verdict to each target: JSON lines at once, each network target from its own background thread.

    `failed` counts the verdicts that did not reach every target (refused after their retries, or `dropped`: pushed
    out of a target's full queue); each is reported once per target that missed it."""

    def __init__(self, targets: list[Any], report: Callable[[str], None] = lambda _text: None) -> None:
        self.local = [t for t in targets if isinstance(t, JsonLines)]
        self.report, self.failed, self.dropped = report, 0, 0
        self._lock, self._closed = threading.Lock(), False
        self.lanes = [_Lane(t, self._settle) for t in targets if not isinstance(t, JsonLines)]

    def send(self, message: Message, on_sent: Callable[[], None] | None = None,
             on_partial: Callable[[list[str]], None] | None = None, skip: Collection[str] = ()) -> None:
        """Send to every target but those named in `skip` (they have it already); `on_sent` runs once all of them
        have the message, and after a miss `on_partial` with the names of the targets that did take it."""
        local = [target for target in self.local if target.name not in skip]
        lanes = [lane for lane in self.lanes if lane.name not in skip]
        if not local and not lanes:
            if on_sent:
                on_sent()
            return
        delivery = _Delivery(message, len(local) + len(lanes), on_sent, on_partial)
        for target in local:  # written at once: a resend skips those that took it
            try:
                target.send(message)
            except OSError as exc:  # its reader gone: a miss, as a network target's (the line goes on judging)
                self._settle(delivery, target.name, exc)
            else:
                self._settle(delivery, target.name, None)
        for lane in lanes:
            for dropped in lane.put(delivery):
                with self._lock:
                    self.dropped += 1
                self._settle(dropped, lane.name, ConnectionError(f"{lane.name}'s queue was full ({QUEUE_LIMIT:,} "
                                                                 "verdicts waiting); the oldest made room"))

    def _settle(self, delivery: _Delivery, target: str, error: Exception | None) -> None:
        """One target's outcome for a message: a miss reported; once every target settled, `on_sent` when all took
        it, else `on_partial` with those that did."""
        if error is not None:
            self.report(f"verdict {delivery.message.get('id')} not delivered: {error}")
        first_failure, settled = delivery.settle(target, error is None)
        if settled:
            try:
                if not delivery.failed and delivery.on_sent:
                    delivery.on_sent()
                elif delivery.failed and delivery.took and delivery.on_partial:
                    delivery.on_partial(delivery.took)
            except Exception as exc:  # noqa: BLE001 - e.g. the audit database: counted and reported, sending goes on
                self.report(f"verdict {delivery.message.get('id')} was delivered but not recorded as such: {exc}")
                first_failure = first_failure or not delivery.failed
        if first_failure:
            with self._lock:
                self.failed += 1

    def idle(self) -> bool:
        """Nothing on its way to a network target (queued, or being sent)."""
        return not any(lane.queue.unfinished_tasks for lane in self.lanes)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message was sent (or failed), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        """Send what is queued (30 s at most), then stop the threads and close the targets; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        for lane in self.lanes:
            lane.queue.put(None)
        for lane in self.lanes:
            lane.thread.join(timeout=5)
            if hasattr(lane.target, "close"):
                lane.target.close()


def check_topic(topic: str) -> None:
    """Raise unless `topic` is one an MQTT message may be published to (broker would refuse every verdict otherwise):
    not empty, no wildcard (+, #), no NUL, at most 65,535 bytes."""
    if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0") or len(topic.encode()) > 65_535:
        raise SettingsError(f"--mqtt-topic must be an MQTT topic to publish to: not empty, without the wildcards + and "
                            f"# or NUL, at most 65,535 bytes; got {topic!r:.80}")


def dispatcher(jsonl: bool = False, webhook: str | None = None, mqtt: str | None = None,
               topic: str = MQTT_TOPIC, report: Callable[[str], None] = lambda _text: None) -> Dispatcher:
    """The dispatcher of the command-line options: --jsonl, --webhook URL, --mqtt HOST[:PORT] (--mqtt-topic)."""
    targets: list[Any] = [JsonLines()] if jsonl else []
    if webhook:
        targets.append(Webhook(webhook))
    if mqtt:
        targets.append(Mqtt(mqtt, topic))
    return Dispatcher(targets, report)

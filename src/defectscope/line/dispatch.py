"""Verdict dispatch to the line: a JSON line on stdout, a webhook (HTTP POST, retried) and MQTT (QoS 1).

Each message is the audit record (with its id), so a receiver can tell a repeat from a new verdict.
Webhooks and MQTT publish from a background thread with a bounded queue: scoring never waits on the
network, and a message that cannot be delivered after its retries is counted and reported.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from defectscope.errors import InputError, SettingsError

Message = dict[str, Any]
QUEUE_LIMIT = 10_000  # messages waiting for the network at most; beyond it the oldest are dropped and counted


def _text(message: Message) -> str:
    return json.dumps(message, sort_keys=True, allow_nan=False, default=str)


@dataclass
class JsonLines:
    """One JSON line per verdict on a text stream (stdout by default), flushed at once."""

    stream: TextIO = field(default_factory=lambda: sys.stdout)

    def send(self, message: Message) -> None:
        self.stream.write(_text(message) + "\n")
        self.stream.flush()


class Webhook:
    """POST each verdict as JSON to a URL; a failed POST (network error or a status of 400 and above) is retried
    `retries` times with doubling waits from `backoff` seconds."""

    def __init__(self, url: str, retries: int = 3, backoff: float = 0.5, timeout: float = 5.0) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise SettingsError(f"--webhook must be an http(s) URL, got {url!r}")
        import httpx

        self.url, self.retries, self.backoff = url, retries, backoff
        self.client = httpx.Client(timeout=timeout)

    def send(self, message: Message) -> None:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url, content=_text(message),
                                            headers={"content-type": "application/json"})
                if response.status_code < 400:
                    return
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ConnectionError(f"webhook {self.url} refused the verdict after {self.retries + 1} tries ({reason})")


class Mqtt:
    """Publish each verdict to an MQTT broker (paho-mqtt, QoS 1: the broker acknowledges every message)."""

    def __init__(self, address: str, topic: str = "defectscope/verdicts", timeout: float = 5.0) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise SettingsError("MQTT dispatch needs paho-mqtt: pip install 'defectscope[line]'") from exc
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "1883")
        if not host or not port.isdigit():
            raise SettingsError(f"--mqtt must be HOST or HOST:PORT, got {address!r}")
        self.topic, self.timeout = topic, timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
        try:
            self.client.connect(host, int(port), keepalive=30)
        except OSError as exc:
            raise InputError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from exc
        self.client.loop_start()

    def send(self, message: Message) -> None:
        info = self.client.publish(self.topic, _text(message), qos=1)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise ConnectionError(f"the MQTT broker did not acknowledge a verdict within {self.timeout:g} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Dispatcher:
    """Sends every verdict to each target: JSON lines at once, the network targets from one background thread."""

    def __init__(self, targets: list[Any], report: Callable[[str], None] = lambda _text: None) -> None:
        self.local = [t for t in targets if isinstance(t, JsonLines)]
        self.remote = [t for t in targets if not isinstance(t, JsonLines)]
        self.report, self.failed, self.dropped = report, 0, 0
        self._queue: queue.Queue[tuple[Message, Callable[[], None] | None] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._run, name="defectscope-dispatch", daemon=True)
        if self.remote:
            self._thread.start()

    def send(self, message: Message, on_sent: Callable[[], None] | None = None) -> None:
        """Send to every target; `on_sent` runs once every target has the message (not after a failure)."""
        for target in self.local:
            target.send(message)
        if not self.remote:
            if on_sent:
                on_sent()
            return
        while True:
            try:
                self._queue.put_nowait((message, on_sent))
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            message, on_sent = item
            try:
                for target in self.remote:
                    target.send(message)
                if on_sent:
                    on_sent()
            except Exception as exc:  # noqa: BLE001 - a failed delivery is counted and reported, scoring goes on
                self.failed += 1
                self.report(f"verdict {message.get('id')} not delivered: {exc}")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message was sent (or failed), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.remote and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        if self.remote:
            self.flush()
            self._queue.put(None)
            self._thread.join(timeout=5)
        for target in self.remote:
            if hasattr(target, "close"):
                target.close()


def dispatcher(jsonl: bool = False, webhook: str | None = None, mqtt: str | None = None,
               topic: str = "defectscope/verdicts", report: Callable[[str], None] = lambda _text: None) -> Dispatcher:
    """The dispatcher of the command-line options: --jsonl, --webhook URL, --mqtt HOST[:PORT] (--mqtt-topic)."""
    targets: list[Any] = [JsonLines()] if jsonl else []
    if webhook:
        targets.append(Webhook(webhook))
    if mqtt:
        targets.append(Mqtt(mqtt, topic))
    return Dispatcher(targets, report)

"""The service's settings, checked in one place."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from defectscope.errors import SettingsError
from defectscope.names import KEPT_MB, MAX_THREADS
from defectscope.settings import Settings, require_range



@dataclass
class ServiceConfig(Settings):
    """Limits and batching. Every upload, request, decode and queue is bounded."""

    batch_wait_ms: float = 5.0  # how long the first image of a batch waits for others (0: no dynamic batching)
    max_batch: int = 32  # images per model call
    max_queue: int = 256  # images waiting per model; beyond it requests get 503 with Retry-After
    max_upload_mb: float = 20.0  # per image file
    max_request_mb: float = 100.0  # per request, all files together
    max_files: int = 64  # images per request
    max_request_megapixels: float = 100.0  # pixels per request, all images together (read from their headers)
    max_queue_megapixels: float = 500.0  # pixels admitted per model (decoding, queued, scoring); beyond it 503
    body_timeout_s: float = 30.0  # a request body must arrive within this time (stalled uploads get 408)
    engine_threads: int | None = None  # threads of an exported model's engine (None: the engine's own choice)
    redeliver_s: float = 60.0  # how often verdicts a dispatch target missed are sent again (once nothing is on its way)
    keep_images_mb: float = KEPT_MB  # most megabytes the kept images take (serve --keep-images); the oldest go first
    token: str | None = None  # the engineer's token: inspect, read, threshold, teach, reload
    operator_token: str | None = None  # the operator's token: inspect and read only
    # with either token set, /v1 and /metrics need "Authorization: Bearer <token>"; with none, every caller is an engineer

    def role_of(self, given: str | None) -> str | None:
        """The role a bearer token grants ('engineer', 'operator'), or None (a wrong or missing token)."""
        if self.token is None and self.operator_token is None:
            return "engineer"
        for role, expected in (("engineer", self.token), ("operator", self.operator_token)):
            if expected and given is not None and hmac.compare_digest(given.encode(), expected.encode()):
                return role
        return None

    def check(self) -> None:
        require_range("batch_wait_ms", self.batch_wait_ms, 0, 1000)
        require_range("max_batch", self.max_batch, 1, 1024)
        require_range("max_queue", self.max_queue, 1)
        require_range("max_upload_mb", self.max_upload_mb, 0, 1024, low_open=True)
        require_range("max_request_mb", self.max_request_mb, 0, 4096, low_open=True)
        require_range("max_files", self.max_files, 1, 10_000)
        require_range("max_request_megapixels", self.max_request_megapixels, 0, 10_000, low_open=True)
        require_range("max_queue_megapixels", self.max_queue_megapixels, 0, 100_000, low_open=True)
        require_range("body_timeout_s", self.body_timeout_s, 0, 3600, low_open=True)
        require_range("engine_threads", self.engine_threads, 1, MAX_THREADS, optional=True)
        require_range("redeliver_s", self.redeliver_s, 0, 86_400, low_open=True)
        require_range("keep_images_mb", self.keep_images_mb, 0, low_open=True)
        for name in ("token", "operator_token"):  # never echoed: a secret
            value = getattr(self, name)
            if value == "":
                raise SettingsError(f"field '{name}' is empty (an unset variable?): it would lock every caller out; "
                                    "give a token or leave it out")
            if value is not None and not all("!" <= c <= "~" for c in value):
                raise SettingsError(f"field '{name}' holds a space or a character beyond visible ASCII, which a client "
                                    "cannot send as 'Authorization: Bearer TOKEN'")
        if self.token and self.token == self.operator_token:
            raise SettingsError("the engineer's and the operator's tokens must differ")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_pixels(self) -> int:
        return int(self.max_request_megapixels * 1_000_000)

    @property
    def max_queue_pixels(self) -> int:
        return int(self.max_queue_megapixels * 1_000_000)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def keep_images_bytes(self) -> int:
        return int(self.keep_images_mb * 1024 * 1024)

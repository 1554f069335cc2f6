"""The time as defectscope writes it down: in the audit trail, the version history and dispatched verdicts."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    """The current time as it is recorded (UTC, ISO 8601, microseconds)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")

"""Verdict messages every dispatch target must get: each sent with its acknowledgement journaled in the audit
trail, and what a target missed sent again while the sender runs (the hot folder, the service) and after a restart."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from defectscope.line.audit import COLUMNS, AuditLog
from defectscope.line.dispatch import Dispatcher

RESEND_BATCH = 1000  # verdicts sent again at a time, oldest first
OUTBOX = "serve"  # the journal of the service's verdicts (a hot folder's is its folder's path)


def send_verdict(audit: AuditLog, dispatch: Dispatcher, record: dict[str, Any], skip: Collection[str] = ()) -> None:
    """Send a journaled verdict's audit record (only its audit fields: a repeat reads as the first message did) to
    every target but those in `skip` (they took it); the journal notes it once all have, and after a miss which did."""
    message, record_id = {key: record[key] for key in ("id", *COLUMNS)}, record["id"]
    dispatch.send(message, on_sent=lambda: audit.delivered(record_id),
                  on_partial=lambda targets: audit.delivered_to(record_id, targets), skip=skip)


def send_missed(audit: AuditLog, dispatch: Dispatcher, journal: str) -> int:
    """Send again, oldest first, up to RESEND_BATCH verdicts of `journal` some target missed (refused, or pushed out of
    a full queue), each only to the targets that missed it, once nothing is on its way any more: a target that is
    back gets them, and one still down is not flooded. Returns how many were sent (RESEND_BATCH: maybe more wait)."""
    if not dispatch.idle():
        return 0
    missed = audit.undelivered(journal, limit=RESEND_BATCH)
    for record in missed:
        send_verdict(audit, dispatch, record, skip=audit.took(record["id"]))
    return len(missed)

"""The service's listening socket, taken before any model is loaded or file written, and uvicorn serving on it."""

from __future__ import annotations

import socket
from typing import Any

from defectscope.errors import DefectscopeError

MAX_CONNECTIONS = 512  # open connections beyond this get 503 from uvicorn: stalled clients cannot pile up
KEEP_ALIVE_S = 5  # idle connections close after this
BACKLOG = 2048  # uvicorn's own


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: one the system picks), or one clear error when the address cannot
    be had (taken by another program, not this machine's, not allowed)."""
    if not 0 <= port <= 65535:
        raise DefectscopeError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise DefectscopeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses its port at once
        listener.bind(address)
        listener.listen(BACKLOG)
    except OSError as exc:
        listener.close()
        raise DefectscopeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return listener


def serve_on(app: Any, listener: socket.socket) -> None:
    """Serve the app on the listening socket until stopped (warnings only in the log)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run(sockets=[listener])

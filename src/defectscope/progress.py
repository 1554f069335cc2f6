"""How long jobs report progress: an advance-by-n callback, and bars that hand one out (the CLI draws them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Progress = Callable[[int], None]
PhaseStart = Callable[[str, int | None], Progress]  # starts a named phase of `total` steps (None: unknown), gives its advance
# A progress factory: given a description and a total, a context manager yielding an advance-by-n callback.
ProgressBar = Callable[[str, int | None], AbstractContextManager[Progress]]


@contextmanager
def no_progress(_description: str, _total: int | None) -> Iterator[Progress]:
    """A bar that shows nothing."""
    yield lambda _n: None

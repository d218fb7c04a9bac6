"""A wall-clock limit for one block of a test: a hang or a runaway match fails the test instead
of blocking the suite."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Timeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Timeout in this (main) thread after ``seconds``: the re module and Python loops
    check for signals, and a blocking open() is interrupted by the signal (PEP 475)."""
    def fire(signum: int, frame: Any) -> None:
        raise Timeout(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

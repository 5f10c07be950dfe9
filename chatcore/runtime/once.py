"""A value built once per process, on first use: a Cloud Function's clients and settings.

Functions Framework may serve requests on several threads, and the first
requests can arrive together: ``Once`` builds under a lock, exactly once, and
later calls return the same value without building again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Once(Generic[T]):
    def __init__(self, build: Callable[[], T]):
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = None

    def __call__(self) -> T:
        value = self._value
        if value is not None:  # built: no lock on every request
            return value
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

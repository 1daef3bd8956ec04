"""A function run in a background thread whose messages are handled on the kernel thread.

The worker never touches a widget: it only calls ``post(kind, payload)``, which puts the message on a
thread-safe queue. The messages are handled, in order, on the thread that started the job (the kernel's), by
whichever comes first:

- the kernel's event loop, when one was running where :meth:`BackgroundJob.start` was called (a Jupyter kernel:
  cells and widget callbacks run inside its asyncio loop): each ``post`` schedules a delivery with
  ``loop.call_soon_threadsafe``, the thread-safe way into that loop, so the widgets update live while the
  kernel is idle;
- :meth:`BackgroundJob.wait`, which handles messages as they arrive until the worker ends (plain Python and
  pytest, where no loop runs; also a notebook cell that waits, since the loop is blocked meanwhile);
- :meth:`BackgroundJob.deliver`, called by the owner when the user interacts (e.g. before a new run starts).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

Post = Callable[[str, Any], None]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread (plain Python, pytest)
        return None


class BackgroundJob:
    """One worker thread at a time; ``handle(kind, payload)`` receives its messages on the kernel thread."""

    def __init__(self, handle: Callable[[str, Any], None]) -> None:
        self._handle = handle
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handling = False
        self.stop_requested = threading.Event()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, work: Callable[[Post, threading.Event], None]) -> None:
        """Run ``work(post, stop_requested)`` in a daemon thread. Call on the kernel thread."""
        self._loop = _running_loop()
        self.stop_requested.clear()
        self._thread = threading.Thread(target=work, args=(self._post, self.stop_requested), daemon=True)
        self._thread.start()

    def _post(self, kind: str, payload: Any = None) -> None:
        """The worker's only way out: queue a message, and wake the kernel's loop if there is one."""
        self._inbox.put((kind, payload))
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.deliver)
            except RuntimeError:  # the loop has closed (the kernel is shutting down): wait() still delivers
                pass

    def deliver(self) -> None:
        """Handle every message queued so far. Kernel thread only; from inside a handler (a widget observer
        that calls back into the owner) it does nothing, since the delivery under way goes on in order."""
        while not self._handling:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._dispatch(message)

    def _dispatch(self, message: tuple[str, Any]) -> None:
        self._handling = True
        try:
            self._handle(*message)
        finally:
            self._handling = False

    def wait(self, timeout: float | None = None) -> None:
        """Handle messages as they come until the worker ends, or ``timeout`` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                message = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            self._dispatch(message)
        self.deliver()

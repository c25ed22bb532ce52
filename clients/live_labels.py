"""Labels for teaching a live stream: key presses in the terminal, or ``LABEL <class>`` lines.

A :class:`LabelBoard` holds the current label (None = unlabelled: the service predicts, learns
nothing). Three inputs set it, each in a daemon thread:

- :class:`KeyLabels`, when stdin is a terminal: ``0``-``9`` label the stream with that class at once,
  ``n`` (or ``-``) stops labelling, ``q`` stops the client. The terminal is put in cbreak mode
  (keys without Enter, no echo) and restored on exit.
- :class:`LineLabels`: lines ``LABEL <class>`` / ``LABEL none`` from stdin, or from a file that is
  followed as it grows (``tail -f``: a stimulus program appends a line whenever it changes what the
  camera sees). Blank lines and ``#`` comments are skipped; anything else is logged and ignored.

How a label reaches the service is the packetizer's business, not the inputs': today each packet
carries the label current when it is cut (the ``label`` query parameter of
``POST /v1/streams/{id}/events``), through :meth:`LabelBoard.label_for_packet`. Delayed labels
(labelling a stretch of time after it was posted) would read :attr:`LabelBoard.changes`, the
timestamped history, instead; the inputs stay as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger("ndot.client")

#: Keys that stop labelling, and the key that stops the client.
NO_LABEL_KEYS, QUIT_KEY = ("n", "-"), "q"
KEYS_HELP = "keys: 0-9 = label the stream with that class, n = no label, q = stop"


class LabelError(ValueError):
    """A label line that is not ``LABEL <class>`` / ``LABEL none`` (message quotes it)."""


@dataclass(frozen=True)
class LabelChange:
    """The label became ``label`` at ``at_s`` (time.monotonic), set by ``origin`` (keys, stdin, a path)."""

    at_s: float
    label: int | None
    origin: str


class LabelBoard:
    """The current label, set from any thread; every change is kept in ``changes`` and logged."""

    def __init__(self, label: int | None = None) -> None:
        self._lock = threading.Lock()
        self._label = label
        self.changes: list[LabelChange] = []

    @property
    def current(self) -> int | None:
        with self._lock:
            return self._label

    def set(self, label: int | None, origin: str) -> None:
        with self._lock:
            self._label = label
            self.changes.append(LabelChange(time.monotonic(), label, origin))
        log.info("event=label label=%s from=%s", "none" if label is None else label, origin)

    def label_for_packet(self) -> int | None:
        """The label a packet cut now carries (per-packet labels: the ``label`` query parameter)."""
        return self.current


def parse_label_line(line: str) -> tuple[bool, int | None]:
    """``(is_label, label)`` of one line: ``LABEL 3`` -> (True, 3), ``LABEL none`` -> (True, None),
    blank or ``#`` -> (False, None); anything else raises :class:`LabelError`."""
    text = line.strip()
    if not text or text.startswith("#"):
        return False, None
    fields = text.split()
    if len(fields) == 2 and fields[0].upper() == "LABEL":
        value = fields[1]
        if value.lower() in ("none", "-"):
            return True, None
        if value.isdigit():
            return True, int(value)
    raise LabelError(f"expected 'LABEL <class>' (class >= 0) or 'LABEL none', got {text[:80]!r}")


class LineLabels(threading.Thread):
    """Reads ``LABEL`` lines from a text stream (stdin) or follows a file as it grows."""

    def __init__(
        self, board: LabelBoard, stop: threading.Event, stream: TextIO | None = None, path: Path | None = None
    ) -> None:
        super().__init__(name="ndot-labels", daemon=True)
        if (stream is None) == (path is None):
            raise ValueError("give a stream or a path")
        self.board, self.stop, self.stream, self.path = board, stop, stream, path
        self.origin = "stdin" if stream is not None else str(path)

    def handle(self, line: str) -> None:
        try:
            is_label, label = parse_label_line(line)
        except LabelError as error:
            log.warning("event=label_ignored from=%s reason=%r", self.origin, str(error))
            return
        if is_label:
            self.board.set(label, self.origin)

    def run(self) -> None:
        if self.stream is not None:
            for line in self.stream:  # EOF ends the thread; the label stays as last set
                if self.stop.is_set():
                    return
                self.handle(line)
            return
        self._follow(self.path)

    def _follow(self, path: Path) -> None:
        while not self.stop.is_set() and not path.exists():
            self.stop.wait(0.2)
        if self.stop.is_set():
            return
        with open(path, encoding="utf-8", errors="replace") as lines:
            partial = ""
            while not self.stop.is_set():
                chunk = lines.readline()
                if not chunk:
                    self.stop.wait(0.1)
                    continue
                partial += chunk
                if partial.endswith("\n"):
                    self.handle(partial)
                    partial = ""


class KeyLabels(threading.Thread):
    """Single key presses on a terminal (cbreak mode) set the label; ``q`` sets ``stop``."""

    def __init__(self, board: LabelBoard, stop: threading.Event, fd: int | None = None) -> None:
        super().__init__(name="ndot-keys", daemon=True)
        self.board, self.stop = board, stop
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list | None = None

    def __enter__(self) -> KeyLabels:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Give the terminal its settings back (idempotent)."""
        if self._saved is not None:
            import termios

            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def handle(self, key: str) -> None:
        if key.isdigit():
            self.board.set(int(key), "keys")
        elif key in NO_LABEL_KEYS:
            self.board.set(None, "keys")
        elif key == QUIT_KEY:
            log.info("event=stop_requested from=keys")
            self.stop.set()

    def run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(self.fd, 1)
            if not data:  # the terminal went away
                return
            self.handle(data.decode("ascii", errors="ignore"))


def start_label_input(
    mode: str, board: LabelBoard, stop: threading.Event
) -> tuple[threading.Thread | None, Callable[[], None]]:
    """Start the input ``mode`` picks (``auto``, ``keys``, ``stdin``, ``none`` or a file path).

    ``auto``: keys when stdin is a terminal, else ``LABEL`` lines from stdin. Returns the thread (or
    None) and a cleanup that restores the terminal.
    """
    if mode == "auto":
        mode = "keys" if sys.stdin is not None and sys.stdin.isatty() else "stdin"
    if mode == "none":
        return None, lambda: None
    if mode == "keys":
        if not sys.stdin.isatty():
            raise LabelError("--labels keys needs stdin to be a terminal; use --labels stdin or a file")
        keys = KeyLabels(board, stop).__enter__()
        print(f"ndot-client: {KEYS_HELP}", file=sys.stderr)
        return keys, keys.restore
    if mode == "stdin":
        thread = LineLabels(board, stop, stream=sys.stdin)
    else:
        thread = LineLabels(board, stop, path=Path(mode))
    thread.start()
    return thread, lambda: None

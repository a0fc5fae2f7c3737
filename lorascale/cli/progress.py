"""Progress of a run on stderr: the stages before the matrices (logger "lorascale"), then the matrices as a
bar in a terminal, as plain lines elsewhere; hub downloads beside them."""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING

from lorascale import settings

if TYPE_CHECKING:
    from lorascale.io.downloads import DownloadStatus

STAGE_DELAY = 2.0  # seconds a stage lasts before it is shown


class Progress:
    """Progress of the matrices on stderr, and the stages before them (logger "lorascale", see pipeline.log).

    In a terminal: one bar redrawn in place, `matrices 3/14 21% | elapsed 0:12 | 0.25 matrices/s | ETA 0:44 |
    <matrix>`.  Elsewhere (CI, Slurm, `ray job logs`): the same text as a plain line whenever another
    `every_percent` of the matrices is done or `every_seconds` have passed (LORASCALE_PROGRESS_SECONDS,
    default 30), and at the end.  Rates count only the matrices this process computed (a resume skips some).
    Disabled (--quiet): nothing, not even the stages; warnings still show.  Hub streaming reports its
    downloads from its own threads (downloads()): beside the bar in a terminal, one line per finished file
    elsewhere.
    """

    _live: weakref.WeakSet[Progress] = weakref.WeakSet()

    @classmethod
    def silence_all(cls) -> None:
        """No line from any progress of this process any more: the command's error line comes last."""
        for progress in list(cls._live):
            progress.silenced = True

    def __init__(self, enabled: bool, *, stream=None, interactive: bool | None = None,
                 every_seconds: float | None = None, every_percent: float = 5.0) -> None:
        self.enabled = enabled
        self.silenced = False  # set by silence_all()
        Progress._live.add(self)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self.every_seconds = settings.progress_seconds() if every_seconds is None else every_seconds
        self.every_percent = every_percent
        self.started = time.monotonic()
        self.first: int | None = None  # matrices already done when this process started computing
        self.last_line, self.last_percent, self.width = self.started, float("-inf"), 0  # the first one shows
        self.lock = threading.RLock()
        self.timer: threading.Timer | None = None  # the stage not yet shown
        self.download: str | None = None  # "downloaded 2/5 files, 120/300 MB" while hub files stream
        self.current: tuple[int, int, str] | None = None  # the last (done, total, matrix) drawn
        self.handler = StageHandler(self)
        stages = logging.getLogger("lorascale")
        stages.addHandler(self.handler)
        stages.setLevel(logging.INFO if enabled else logging.WARNING)
        self.handler.setLevel(logging.INFO if enabled else logging.WARNING)

    def __call__(self, done: int, total: int, matrix: str) -> None:
        self._end_stage()
        if not self.enabled:
            return
        with self.lock:  # hub downloads draw from their own threads
            self._draw(done, total, matrix)

    def _draw(self, done: int, total: int, matrix: str) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done - 1
        percent = 100.0 * done / total if total else 100.0
        self.current = (done, total, matrix)
        text = self.text(done, total, matrix, now)
        if self.interactive:
            self._write("\r" + text.ljust(self.width), end="")
            self.width = len(text)
            if done >= total:
                self._write("")
                self.width = 0
        elif (done >= total or now - self.last_line >= self.every_seconds
              or percent >= self.last_percent + self.every_percent):
            self._write(text)
            self.last_line, self.last_percent = now, percent

    def text(self, done: int, total: int, matrix: str, now: float) -> str:
        elapsed = now - self.started
        computed = done - (self.first if self.first is not None else 0)
        rate = computed / elapsed if elapsed > 0 else 0.0
        if rate <= 0:
            speed, eta = "rate -", "ETA -"
        else:
            speed = f"{rate:.2f} matrices/s" if rate >= 1 else f"{1 / rate:.1f} s/matrix"
            eta = f"ETA {_clock((total - done) / rate)}"
        percent = 100 * done // total if total else 100
        bar = ""
        if self.interactive:
            filled = 20 * done // total if total else 20
            bar = "[" + "#" * filled + "-" * (20 - filled) + "] "
        download = f" | {self.download}" if self.download and self.interactive else ""
        return (f"{bar}matrices {done}/{total} {percent}% | elapsed {_clock(elapsed)} | {speed} | {eta} | "
                f"{matrix}{download}")

    def downloads(self, status: DownloadStatus) -> None:
        """A DownloadStatus from the hub streaming threads."""
        if not self.enabled:
            return
        mb = 1024 * 1024
        text = (f"downloaded {status.files_done}/{status.files_total} files, "
                f"{status.bytes_done / mb:.0f}/{status.bytes_total / mb:.0f} MB")
        with self.lock:
            self.download = text
            if not self.interactive:  # a log: one line per finished file
                if status.finished is not None:
                    self._write(f"lorascale: {text}, {status.finished}")
                return
            if self.current is not None:
                done, total, matrix = self.current
                line = self.text(done, total, matrix, time.monotonic())
                self._write("\r" + line.ljust(self.width), end="")
                self.width = len(line)
            else:
                self._write("\r" + text.ljust(self.width), end="")
                self.width = len(text)

    def stage(self, message: str, *, now: bool = False) -> None:
        """A line saying what happens now (resolve, headers, Ray start-up, report writing), written once the
        stage has lasted STAGE_DELAY seconds (or every_seconds, if shorter), or at once with `now`.  Quick
        stages stay silent, so that bad input still ends with one line on stderr: the error."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            delay = min(STAGE_DELAY, self.every_seconds)
            if now or delay <= 0:
                self._show(message)
                return
            self.timer = threading.Timer(delay, self._show_if_current, args=(message,))
            self.timer.daemon = True
            self.timer.start()

    def _show_if_current(self, message: str) -> None:
        with self.lock:
            if self.timer is not None and self.timer.args == (message,):
                self.timer = None
                self._show(message)

    def _show(self, message: str) -> None:
        if self.width:  # a bar is drawn: keep it, start the message on a line of its own
            self._write("")
            self.width = 0
        self._write(message)

    def _end_stage(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _write(self, text: str, end: str = "\n") -> None:
        if self.silenced:  # the command has failed: its error line is the last one (_last_line)
            return
        try:
            self.stream.write(text + end)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone (`2>&1 | head`): progress is not worth a failure
            self.enabled = False

    def close(self) -> None:
        self._end_stage()
        if self.width:
            self._write("")
            self.width = 0
        logging.getLogger("lorascale").removeHandler(self.handler)


class StageHandler(logging.Handler):
    """Stages and warnings from the library (logger "lorascale") as `lorascale: ...` lines on stderr."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING
        prefix = "lorascale: warning: " if warning else "lorascale: "
        self.progress.stage(prefix + record.getMessage(), now=warning)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


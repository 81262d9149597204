"""Progress bars for long commands (replay, bench, inspect --check), drawn by tqdm.

A bar goes to stderr, and only where it is wanted: ``--progress`` asks for one,
``--no-progress`` refuses it, and by default there is one when stderr is a
terminal.  stdout, where ``--json`` output goes, never carries one.

    with bar(total=len(trace), desc="replay", enabled=wanted(args.progress)) as b:
        for ...:
            b.update(1, note=f"hit {ratio:.3f}")

tqdm is optional (``pip install 'kvtier[progress]'``): without it a wanted bar is
not drawn, and one log line says why.
"""
from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger(__name__)
_warned = False


def add_flags(parser) -> None:
    """``--progress`` / ``--no-progress`` (default: a bar when stderr is a terminal)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def wanted(flag: bool | None, stream=None) -> bool:
    """The flag when given, else whether ``stream`` (stderr) is a terminal."""
    if flag is not None:
        return bool(flag)
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):       # closed or replaced stream
        return False


def _tqdm():
    global _warned
    try:
        from tqdm import tqdm
        return tqdm
    except ImportError:
        if not _warned:
            _warned = True
            log.info("tqdm is not installed (pip install 'kvtier[progress]'): no progress bar")
        return None


class Bar:
    """A tqdm bar, or nothing at all when not enabled (every method is then a no-op)."""

    def __init__(self, total: int | None, desc: str, enabled: bool, unit: str = "it", file=None,
                 interval: float = 0.5):
        tqdm = _tqdm() if enabled else None
        self._bar = None if tqdm is None else tqdm(
            total=total, desc=desc, unit=unit, file=file if file is not None else sys.stderr,
            mininterval=interval, dynamic_ncols=True, leave=True)
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, note: str | None = None) -> None:
        if self._bar is None:
            return
        if note is not None:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(n)

    def tick_while_running(self, every: float = 1.0) -> None:
        """Redraw (elapsed time) from a thread until ``close``: for work that reports no steps."""
        if self._bar is None or self._ticker is not None:
            return

        def run() -> None:
            while not self._stop.wait(every):
                self._bar.refresh()

        self._ticker = threading.Thread(target=run, name="kvtier-progress", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int | None, desc: str, enabled: bool, unit: str = "it", file=None) -> Bar:
    return Bar(total, desc, enabled, unit=unit, file=file)

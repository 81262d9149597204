"""``kvtier inspect DIR [--check]``: what a disk tier directory holds.

Prints blocks, bytes, namespaces and free space; with ``--check`` reads every
indexed block back and verifies it against the index (exit code 1 when index
and slabs disagree, or when the index itself is damaged: overwritten, truncated
or bit-flipped pages are findings, never an error exit).  ``--check`` on a big
directory draws a progress bar on stderr when stderr is a terminal
(``--progress`` / ``--no-progress`` to choose).  The directory is
opened read-only and without taking the tier's lock, so it can be inspected
while a server uses it (figures may then move while they are read).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from ..errors import ConfigError, KVTierError
from ..progress import Bar, add_flags as add_progress_flags, wanted

BIG_BLOCKS = 10_000             # a check of fewer blocks gets a bar only when asked (--progress)


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="a disk tier directory (disk.path)")
    parser.add_argument("--check", action="store_true",
                        help="read every block back and verify index and slabs agree")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_flags(parser)


def inspect_dir(path: str, check: bool = False, progress: bool | None = False) -> dict:
    """The summary (and with ``check`` the verification report) of a tier directory.

    The index is read in a child process: LMDB trusts the sizes in its pages, so
    a damaged page can make a read run off the end of the mapped file (SIGBUS).
    That kills the child, not this process, and is reported as index damage.
    ``progress``: True draws the check's bar on this process's stderr, None only
    for a big directory (at least BIG_BLOCKS blocks), False never."""
    where = os.path.join(path, "index")
    if not os.path.exists(os.path.join(where, "data.mdb")):
        raise ConfigError("dir", path, "a disk tier directory (it has no index/data.mdb)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = ("import json, sys\nfrom kvtier.cli.inspect import _inspect_here\n"
            "print(json.dumps(_inspect_here(sys.argv[1], sys.argv[2] == 'check', int(sys.argv[3]), "
            "sys.argv[4] == 'always'), default=str))")
    # the child's stderr is read for its error message: its bar goes to a copy of ours
    bar_fd = _dup_stderr() if check and progress is not False else -1
    try:
        r = subprocess.run([sys.executable, "-c", code, path, "check" if check else "summary", str(bar_fd),
                            "always" if progress else "big"],
                           capture_output=True, text=True, env=env, pass_fds=(bar_fd,) if bar_fd >= 0 else ())
    finally:
        if bar_fd >= 0:
            os.close(bar_fd)
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name if -r.returncode in signal.valid_signals() \
            else f"signal {-r.returncode}"
        return _damaged(path, f"disk index {where}: reading it killed the checker ({name})")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise KVTierError(f"inspect {path}: the checker failed (exit {r.returncode}): {last}")
    return json.loads(r.stdout)


def _inspect_here(path: str, check: bool, bar_fd: int = -1, always: bool = False) -> dict:
    """inspect_dir's work, in this process; the check's bar is drawn on ``bar_fd`` (-1: none)."""
    from ..tiers.disk.check import summarize, verify
    from ..tiers.disk.index import DiskIndex, IndexFailure
    from ..tiers.disk.slabs import SlotGeometry

    where = os.path.join(path, "index")
    try:
        index = DiskIndex(where, 1, readonly=True)
    except IndexFailure as e:
        return _damaged(path, str(e))
    try:
        try:
            geo = index.geometry()
            if geo is None:
                return {"path": path, "ok": False, "problems": ["index has no geometry record"]}
            raw = index.get_meta(b"num_slots")
            num_slots = int(raw) if raw else 0
            g = SlotGeometry(geo["block_bytes"], geo["slot_bytes"], geo["slots_per_slab"],
                             max(num_slots, 1))
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:   # ConfigError is a ValueError
            return _damaged(path, f"disk index {where}: geometry record is unusable ({e!r})")
        except IndexFailure as e:
            return _damaged(path, str(e))
        try:
            out = summarize(index, g, path)
        except IndexFailure as e:
            return _damaged(path, str(e))
        out["in_use_by_pid"] = _holder(path)
        if check:
            show = bar_fd >= 0 and (always or out["blocks"] >= BIG_BLOCKS)
            stream = os.fdopen(bar_fd, "w", closefd=False) if show else None
            with Bar(out["blocks"], "check", show, unit="block", file=stream) as bar:
                # a damaged index is one of the report's problems
                report = verify(_Counting(index, bar) if bar.enabled else index, g, path)
            report.pop("slots", None)
            out["check"] = report
            out["ok"] = report["ok"]
        return out
    finally:
        index.close()


def _dup_stderr() -> int:
    """A copy of stderr's descriptor for the child's bar; -1 where stderr has none (captured)."""
    try:
        return os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return -1


class _Counting:
    """The index as verify() reads it, each entry counted into the progress bar."""

    def __init__(self, index, bar: Bar):
        self._index, self._bar = index, bar

    def items(self):
        for item in self._index.items():
            self._bar.update(1)
            yield item

    def __getattr__(self, name):
        return getattr(self._index, name)


def _damaged(path: str, why: str) -> dict:
    """The report on an index whose damage stops even the summary: a finding (exit 1)."""
    return {"path": path, "ok": False, "problems": [f"index damaged: {why}"]}


def _holder(path: str) -> str | None:
    import fcntl
    try:
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def main(args) -> int:
    progress = None if args.progress is None and wanted(None) else bool(args.progress)
    out = inspect_dir(args.dir, check=args.check, progress=progress)
    if args.json:
        print(json.dumps(out, indent=None, default=str))
    else:
        _print(out)
    return 0 if out.get("ok", True) else 1


def _print(out: dict) -> None:
    if "blocks" not in out:
        print(f"{out['path']}: {'; '.join(out.get('problems', []))}")
        return
    mib = 1 << 20
    print(f"directory     {out['path']}" + (f"  (in use by pid {out['in_use_by_pid']})"
                                            if out.get("in_use_by_pid") else ""))
    print(f"blocks        {out['blocks']}  ({out['bytes'] / mib:.1f} MiB of {out['block_bytes']}-byte blocks)")
    print(f"slots         {out['capacity_slots']} of {out['slot_bytes']} bytes, {out['free_slots']} free "
          f"({out['free_bytes'] / mib:.1f} MiB)")
    print(f"slab files    {out['slab_files']}, {out['slab_bytes_on_disk'] / mib:.1f} MiB on disk")
    for label, n in sorted(out["namespaces"].items()):
        print(f"namespace     {label}: {n} blocks")
    if "check" in out:
        c = out["check"]
        print(f"check         {'ok' if c['ok'] else 'FAILED'}: {c['blocks']} entries, {c['bad_blocks']} bad"
              + (f" {c['problem_kinds']}" if c["problem_kinds"] else ""))
        for p in c["problems"]:
            print(f"  {p}")

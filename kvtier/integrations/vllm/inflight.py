"""The worker's copies in flight: one op's transfers, until every one is done.

An op (a load or a store of one request's blocks) becomes one transfer per KV
cache group (a :class:`~kvtier.gpu.transfer.Transfer`, or a
:class:`~kvtier.gpu.transfer.LayerwiseLoad` for loads the forward waits on
layer by layer).  The worker reports an op to the scheduler side only once
all its transfers have finished, so a store's slot becomes visible to lookups
only after its bytes are in place, and an async load is finished only after
its pages are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class InflightOp:
    op: Any                        # LoadOp | StoreOp
    transfers: list = field(default_factory=list)   # per KV cache group; None: no page of that group
    error: str | None = None       # set when submitting failed: the op failed without copying

    @property
    def num_blocks(self) -> int:
        return len(self.op.slots)

    @property
    def live(self) -> list:
        """The transfers actually submitted."""
        return [t for t in self.transfers if t is not None]

    def done(self) -> bool:
        return all(t.done() for t in self.live)

    def ok(self) -> bool:
        """Valid once done(): every transfer succeeded and nothing failed to submit."""
        return self.error is None and all(t.ok for t in self.live)

    def why(self) -> str:
        return self.error or next((str(t.error) for t in self.live if t.ok is False), "unknown")

    def seconds(self) -> float:
        return sum(t.seconds or 0.0 for t in self.live)

    def wait_on_stream(self) -> None:
        """Order the compute stream after every transfer (the host waits for host copies)."""
        for t in self.live:
            t.wait_on_stream()


def take_done(ops: list[InflightOp]) -> tuple[list[InflightOp], list[InflightOp]]:
    """Split into (finished, still running), keeping the order."""
    status = [o.done() for o in ops]          # asked once: a copy may finish meanwhile
    return [o for o, d in zip(ops, status) if d], [o for o, d in zip(ops, status) if not d]

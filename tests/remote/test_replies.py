"""How kvtier serve sends get replies: small blocks copied, large ones from their leased slot.

Either way a reply carries the stored bytes and its lease ends (at once for a copied
block, once ZeroMQ lets go of the frame otherwise), so a namespace filled to its quota
can still take new blocks after any number of gets.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

pytest.importorskip("zmq")

from kvtier.remote import server as S  # noqa: E402
from kvtier.remote.store import TRAILER          # noqa: E402
from kvtier.remote.client import RemoteTier       # noqa: E402

NUM_SLOTS = 4


class InProcessServer:
    """A Server whose loop runs on a thread between start() and stop()."""

    def __init__(self, block_bytes: int):
        slot = -(-(block_bytes + TRAILER.size) // 4096) * 4096
        self.srv = S.Server("tcp://127.0.0.1:0", capacity_bytes=NUM_SLOTS * slot,
                            default_quota=NUM_SLOTS * slot)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.srv.serve_once(20)

    def start(self) -> "InProcessServer":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def open_handles(self) -> int:
        """Leases still held once every tracked send has finished (bounded wait)."""
        deadline = time.monotonic() + 10
        while self.srv._pending and time.monotonic() < deadline:
            self.srv._reap()
            time.sleep(0.01)
        return sum(st.cache.stats().get("open_handles", 0) for st in self.srv.stores.values())


def keys_of(*ids: int) -> list[bytes]:
    return [i.to_bytes(16, "little") for i in ids]


@pytest.mark.parametrize("block_bytes", [64 << 10, S.COPY_BLOCK_BYTES, S.COPY_BLOCK_BYTES + 4096, 1 << 20])
def test_gets_release_their_leases(block_bytes):
    server = InProcessServer(block_bytes).start()
    tier = RemoteTier("remote", block_bytes, [server.srv.endpoint], namespace="t", timeout_ms=10_000)
    try:
        blocks = [os.urandom(block_bytes) for _ in range(NUM_SLOTS)]
        keys = keys_of(*range(NUM_SLOTS))
        assert tier.write(keys, [0] * NUM_SLOTS, blocks) == [True] * NUM_SLOTS
        assert server.srv.stores["t"].cache.tiers[0].num_slots == NUM_SLOTS
        for _ in range(3):
            for i in range(NUM_SLOTS):
                out = [memoryview(bytearray(b"\xa5" * block_bytes))]
                assert tier.read([keys[i]], [0], out) == [True]
                assert bytes(out[0]) == blocks[i]
            outs = [memoryview(bytearray(block_bytes)) for _ in range(NUM_SLOTS)]
            assert tier.read(keys, [0] * NUM_SLOTS, outs) == [True] * NUM_SLOTS
            assert [bytes(o) for o in outs] == blocks
        server.stop()
        assert server.open_handles() == 0
        if block_bytes <= S.COPY_BLOCK_BYTES:
            assert not server.srv._pending          # copied replies hold nothing after the send
        server.start()
        # the namespace is full: new blocks evict the old ones, which no lease pins
        fresh = [os.urandom(block_bytes) for _ in range(NUM_SLOTS)]
        new_keys = keys_of(*range(100, 100 + NUM_SLOTS))
        assert tier.write(new_keys, [0] * NUM_SLOTS, fresh) == [True] * NUM_SLOTS
        outs = [memoryview(bytearray(block_bytes)) for _ in range(NUM_SLOTS)]
        assert tier.read(new_keys, [0] * NUM_SLOTS, outs) == [True] * NUM_SLOTS
        assert [bytes(o) for o in outs] == fresh
    finally:
        tier.close()
        if server._thread is not None and server._thread.is_alive():
            server.stop()
        server.srv.close()


@pytest.mark.parametrize("disk", [False, True], ids=["host", "host+disk"])
def test_store_serves_runs_around_refused_and_damaged_blocks(tmp_path, disk):
    """A put whose block fails its checksum stores the others; a get leases runs of
    stored keys and answers a block without its trailer as a miss (and drops it)."""
    from kvtier.remote import protocol as P
    from kvtier.remote.store import NamespaceStore
    bb = 64 << 10
    st = NamespaceStore("t", bb, 16 * (bb + 4096), str(tmp_path) if disk else None, 64 << 20)
    try:
        keys = keys_of(*range(6))
        blocks = [os.urandom(bb) for _ in keys]
        crcs = P.payload_crcs(blocks)
        torn = bytearray(blocks[3])
        torn[7] ^= 1
        stored, corrupt = st.put(keys, crcs, blocks[:3] + [bytes(torn)] + blocks[4:])
        assert stored == [True, True, True, False, True, True] and corrupt == 1
        assert st.exists(keys) == [True, True, True, False, True, True]
        assert st.cache.flush(10)
        h = st.cache.prepare_load([keys[1]], owner="test")      # a block never written whole
        h.views[0][bb:] = TRAILER.pack(0, 0)
        st.cache.complete_load(h)

        found, got_crcs, payloads, handles = st.get(keys + keys_of(99), 1.0)
        assert found == [True, False, True, False, True, True, False]
        assert [bytes(p) for p in payloads] == [blocks[i] for i in (0, 2, 4, 5)]
        assert got_crcs == [crcs[i] for i in (0, 2, 4, 5)]
        assert (handles == []) if disk else (len(handles) == 2)   # two runs leased: 0-2, then 4-5
        for h in handles:
            st.cache.complete_load(h)
        assert st.exists(keys) == [True, False, True, False, True, True]
        assert st.cache.stats().get("open_handles", 0) == 0
    finally:
        st.close()

"""10,000+ random and mutated frames against a live `kvtier serve`.

The server must answer every message (one reply each, in order, since it serves
one connection's requests in arrival order), never crash, answer invalid
messages with an error, never send a block whose checksum is wrong or whose
bytes differ from what was stored, and afterwards still serve a well-behaved
client correctly.
"""
from __future__ import annotations

import random

import msgpack
import pytest

from kvtier import native
from kvtier.remote import protocol as P
from kvtier.remote.client import RemoteTier

from tests.helpers import block, k

BB = 1024
NUM_MESSAGES = 10_500
KNOWN = [k(1000 + i) for i in range(32)]   # none is all zeros, a value the mutator writes
DATA = {x: block(x, BB) for x in KNOWN}


def _templates(rng: random.Random, rid: int) -> list[bytes]:
    """One well-formed request of a random kind, as frames."""
    op = rng.choice(["get", "put", "exists", "delete", "health", "stats"])
    n = rng.randrange(1, 6)
    if op == "delete":                            # fuzzed deletes only touch keys we never check
        keys = [rng.randbytes(16) for _ in range(n)]
    else:
        keys = [rng.choice(KNOWN) if rng.random() < 0.7 else rng.randbytes(16) for _ in range(n)]
    if op == "put":
        keys = [rng.randbytes(16) for _ in range(n)]    # fresh keys: never overwrite a checked one
        body = [rng.randbytes(BB) for _ in range(n)]
        crcs = [native.crc32c(b) for b in body]
        return [P.encode_request(op, rid, "fuzz", keys=keys, block_bytes=BB, crcs=crcs), *body]
    return [P.encode_request(op, rid, "fuzz", keys=keys, block_bytes=BB)]


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = [bytearray(f) for f in frames]
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(9)
        f = rng.randrange(len(frames))
        if kind == 0 and frames[f]:                       # flip bytes
            for _ in range(rng.randrange(1, 5)):
                frames[f][rng.randrange(len(frames[f]))] ^= 1 << rng.randrange(8)
        elif kind == 1:                                   # truncate
            frames[f] = frames[f][:rng.randrange(len(frames[f]) + 1)]
        elif kind == 2 and len(frames) > 1:               # drop a frame
            del frames[rng.randrange(1, len(frames))]
        elif kind == 3:                                   # add a frame
            frames.append(bytearray(rng.randbytes(rng.choice([0, 1, BB - 1, BB, BB + 1]))))
        elif kind == 4:                                   # extend
            frames[f] += rng.randbytes(rng.randrange(1, 40))
        elif kind in (5, 6, 7):                           # re-encode the header with one field changed
            try:
                d = msgpack.unpackb(bytes(frames[0]))
            except Exception:
                continue
            if not isinstance(d, dict) or not d:
                continue
            field = rng.choice(list(d) + ["v", "bb", "keys"])
            d[field] = rng.choice([None, -1, 0, 2, 2**64 - 1, -2**63, "x", b"", [], {}, [b"\0" * 16] * 3,
                                   1.5, True, BB, BB + 1, "fuzz", "other", [0, 2**32]])
            frames[0] = bytearray(msgpack.packb(d, use_bin_type=True))
        else:                                             # replace a frame with noise
            frames[f] = bytearray(rng.randbytes(rng.randrange(0, 64)))
    return [bytes(f) for f in frames]


def _check_reply(frames_out, reply, stats):
    """Judge one reply against the message it answers."""
    try:
        req = P.decode_request(frames_out)
    except P.ProtocolError:
        req = None
    header = msgpack.unpackb(reply[0])
    assert isinstance(header, dict) and header["v"] == P.VERSION
    if req is None:
        assert header["ok"] is False and header["err"] in P.ERRORS
        stats["errors"] += 1
        return
    assert header["id"] == req.req_id
    if not header["ok"]:
        assert header["err"] in (P.E_BLOCK_SIZE, P.E_NO_ROOM)   # valid, but refused on its merits
        stats["refused"] += 1
        return
    stats["ok"] += 1
    if req.op == "get":
        rep = P.decode_reply(reply, req.req_id, "get", len(req.keys), req.block_bytes)
        it = iter(zip(rep.crcs, rep.payloads))
        for key, found in zip(req.keys, rep.found):
            if found:
                crc, body = next(it)
                assert native.crc32c(body) == crc
                if key in DATA:
                    assert bytes(body) == DATA[key]
                    stats["known_hits"] += 1


@pytest.mark.slow
def test_fuzzed_frames_get_answers_and_the_server_keeps_serving(kvservers):  # noqa: F811
    import zmq
    srv = kvservers(1, "--quota", "64MiB", "--capacity", "64MiB")[0]   # room: nothing evicted
    good = RemoteTier("remote", BB, [srv.endpoint], namespace="fuzz", timeout_ms=2000)
    assert good.write(KNOWN, [0] * len(KNOWN), [DATA[x] for x in KNOWN]) == [True] * len(KNOWN)
    rng = random.Random(20261128)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    stats = {"errors": 0, "refused": 0, "ok": 0, "known_hits": 0}
    sent = 0
    try:
        while sent < NUM_MESSAGES:
            batch = []
            for _ in range(100):
                rid = rng.randrange(2**63)
                frames = _templates(rng, rid)
                r = rng.random()
                if r < 0.15:
                    frames = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 4))]
                elif r < 0.85:
                    frames = _mutate(rng, frames)
                batch.append(frames)
                sock.send_multipart(frames)
            sent += len(batch)
            for frames in batch:
                assert sock.poll(10_000), f"no reply after {sent} messages"
                _check_reply(frames, sock.recv_multipart(), stats)
        assert srv.proc.poll() is None                     # alive
        assert stats["errors"] > 3000 and stats["ok"] > 1000 and stats["known_hits"] > 100, stats
        out = [memoryview(bytearray(BB)) for _ in KNOWN]   # a good client is still served right
        assert good.read(KNOWN, [0] * len(KNOWN), out) == [True] * len(KNOWN)
        assert [bytes(o) for o in out] == [DATA[x] for x in KNOWN]
        assert good.ping()[0]["status"] == "ok"
    finally:
        sock.close(0)
        ctx.term()
        good.close()

"""Wire protocol v1: round trips, and strict rejection of everything else (properties, not examples)."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.remote import protocol as P

from tests.helpers import k

keys_st = st.lists(st.binary(min_size=16, max_size=16), max_size=20)


@given(op=st.sampled_from(P.OPS), rid=st.integers(0, 2**64 - 1), keys=keys_st,
       ns=st.text(min_size=1, max_size=P.MAX_NAMESPACE_CHARS), bb=st.integers(1, 64))
def test_request_round_trip(op, rid, keys, ns, bb):
    crcs = [i * 7919 % 2**32 for i in range(len(keys))]
    payloads = [bytes([i % 256]) * bb for i in range(len(keys))] if op == "put" else []
    header = P.encode_request(op, rid, ns, keys=keys, block_bytes=bb, crcs=crcs)
    req = P.decode_request([header, *payloads])
    assert (req.op, req.req_id, req.ns) == (op, rid, ns)
    if op in P.KEYED_OPS:
        assert req.keys == keys
    if op == "put":
        assert req.crcs == crcs and [bytes(p) for p in req.payloads] == payloads
    if op in ("get", "put"):
        assert req.block_bytes == bb


@given(rid=st.integers(0, 2**64 - 1), found=st.lists(st.booleans(), max_size=20), bb=st.integers(1, 32))
def test_get_reply_round_trip(rid, found, bb):
    n = sum(found)
    header = P.encode_reply(rid, found=found, crcs=list(range(n)))
    rep = P.decode_reply([header] + [b"x" * bb] * n, rid, "get", len(found), bb)
    assert rep.ok and rep.found == found and rep.crcs == list(range(n)) and len(rep.payloads) == n


def _valid(**over):
    d = {"v": P.VERSION, "op": "put", "id": 5, "ns": "a", "keys": [k(1)], "bb": 4, "crcs": [0]}
    d.update(over)
    return msgpack.packb({x: y for x, y in d.items() if y is not ...}, use_bin_type=True)


@pytest.mark.parametrize("header, payloads, code", [
    (_valid(v=2), [b"abcd"], P.E_VERSION),
    (_valid(v=...), [b"abcd"], P.E_VERSION),
    (_valid(v="1"), [b"abcd"], P.E_VERSION),
    (_valid(op="drop"), [b"abcd"], P.E_MALFORMED),
    (_valid(id=-1), [b"abcd"], P.E_MALFORMED),
    (_valid(id=True), [b"abcd"], P.E_MALFORMED),
    (_valid(ns=""), [b"abcd"], P.E_MALFORMED),
    (_valid(ns="x" * 200), [b"abcd"], P.E_MALFORMED),
    (_valid(keys=[b"short"]), [b"abcd"], P.E_MALFORMED),
    (_valid(keys="k" * 16), [b"abcd"], P.E_MALFORMED),
    (_valid(keys=[k(1)] * 5000, crcs=[0] * 5000), [b"abcd"] * 5000, P.E_TOO_LARGE),
    (_valid(bb=0), [b""], P.E_MALFORMED),
    (_valid(bb=1 << 40), [b"abcd"], P.E_MALFORMED),
    (_valid(crcs=[2**32]), [b"abcd"], P.E_MALFORMED),
    (_valid(crcs=[]), [b"abcd"], P.E_MALFORMED),
    (_valid(), [], P.E_MALFORMED),                      # payload missing
    (_valid(), [b"abc"], P.E_MALFORMED),                # truncated payload
    (_valid(), [b"abcde"], P.E_MALFORMED),              # oversized payload
    (_valid(), [b"abcd", b"abcd"], P.E_MALFORMED),      # extra frame
    (_valid(op="get"), [b"abcd"], P.E_MALFORMED),       # get carries no payload
    (msgpack.packb([1, 2, 3]), [], P.E_MALFORMED),
    (b"", [], P.E_MALFORMED),
    (b"\xc1", [], P.E_MALFORMED),                       # reserved msgpack byte
    (_valid()[:-3], [b"abcd"], P.E_MALFORMED),          # truncated header
    (b"\x00" * (P.MAX_HEADER_BYTES + 1), [], P.E_TOO_LARGE),
])
def test_bad_requests_are_rejected_with_a_code(header, payloads, code):
    with pytest.raises(P.ProtocolError) as e:
        P.decode_request([header, *payloads])
    assert e.value.code == code


def test_request_size_limit():
    header = _valid(bb=1024)
    with pytest.raises(P.ProtocolError) as e:
        P.decode_request([header, b"x" * 1024], P.Limits(max_request_bytes=512))
    assert e.value.code == P.E_TOO_LARGE


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_arbitrary_frames_never_escape_as_anything_but_protocol_errors(frames):
    try:
        P.decode_request(frames)
    except P.ProtocolError as e:
        assert e.code in P.ERRORS
    try:
        P.decode_reply(frames, 1, "get", 1, 4)
    except P.ProtocolError as e:
        assert e.code in P.ERRORS
    P.peek_id(frames[0])


@pytest.mark.parametrize("frames, why", [
    ([P.encode_reply(2, found=[True], crcs=[1]), b"abcd"], "other request id"),
    ([P.encode_reply(1, found=[True, False], crcs=[1]), b"abcd"], "wrong found count"),
    ([P.encode_reply(1, found=[True], crcs=[]), b"abcd"], "crc missing"),
    ([P.encode_reply(1, found=[True], crcs=[1])], "payload missing"),
    ([P.encode_reply(1, found=[True], crcs=[1]), b"abc"], "short payload"),
    ([P.encode_reply(1, found=[False], crcs=[]), b"abcd"], "payload for a miss"),
    ([P.encode_reply(1, found=[1], crcs=[1]), b"abcd"], "found not boolean"),
    ([msgpack.packb({"v": 1, "id": 1, "ok": False})], "error without a code"),
])
def test_bad_replies_are_rejected(frames, why):
    with pytest.raises(P.ProtocolError):
        P.decode_reply(frames, 1, "get", 1, 4)


def test_error_reply_decodes():
    rep = P.decode_reply([P.encode_error(3, P.E_DENIED, "no")], 3, "get", 1, 4)
    assert not rep.ok and rep.err == P.E_DENIED and rep.msg == "no"

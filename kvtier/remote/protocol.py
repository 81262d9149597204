"""The kvtier wire protocol, version 1: one msgpack header frame, then raw payload frames.

A request is a ZeroMQ multipart message ``[header, payload_0, ..., payload_n-1]``
sent by a DEALER socket to the server's ROUTER; the reply has the same shape.
Headers are msgpack maps with short string keys; block bytes never pass
through msgpack (no pickle anywhere), so a payload frame can be sent from the
block's memory and received into a buffer without re-encoding.  docs/protocol.md
is the reference; this module is the one implementation of it.

Both directions are validated strictly here: every field's type, every list's
length, every payload's size.  A violation raises :class:`ProtocolError`
carrying an error code; the server turns it into an error reply, the client
into a miss.

    payload_crcs(bufs) -> list[int]                          CRC32C of each payload
    copy_payloads(dsts, srcs) -> list[int]                  copy blocks out of (into) frames, with CRCs
    encode_request(op, req_id, ns, ...) -> bytes           the request header
    decode_request(frames, limits) -> Request               server side
    encode_reply(req_id, ...) / encode_error(req_id, code, msg) -> bytes
    decode_reply(frames, req_id, op, num_keys, block_bytes) -> Reply   client side
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

from .. import native
from ..keys import KEY_BYTES

VERSION = 1
OPS = ("get", "put", "exists", "delete", "health", "stats", "drop")
KEYED_OPS = ("get", "put", "exists", "delete")
MAX_HEADER_BYTES = 256 << 10
MAX_KEYS = 4096
MAX_NAMESPACE_CHARS = 128

# error codes carried in a reply's "err"
E_VERSION = "version"          # unsupported protocol version (the reply says which we speak)
E_MALFORMED = "malformed"      # not a valid header, wrong types, payloads not matching keys
E_TOO_LARGE = "too_large"      # over the server's request-size or key-count limits
E_DENIED = "denied"            # the identity may not use this namespace
E_BLOCK_SIZE = "block_size"    # the namespace holds blocks of another size
E_NO_ROOM = "no_room"          # a new namespace would exceed the server's capacity
E_BUSY = "busy"                # too many bytes in flight: try again shortly (a miss if it persists)
E_INTERNAL = "internal"        # the server failed while serving this request
ERRORS = (E_VERSION, E_MALFORMED, E_TOO_LARGE, E_DENIED, E_BLOCK_SIZE, E_NO_ROOM, E_BUSY, E_INTERNAL)


class ProtocolError(Exception):
    """A frame set that breaks the protocol; ``code`` is one of :data:`ERRORS`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What a server accepts in one request."""
    max_request_bytes: int = 256 << 20
    max_keys: int = MAX_KEYS
    max_block_bytes: int = 64 << 20


@dataclass
class Request:
    op: str
    req_id: int
    ns: str
    block_bytes: int = 0
    keys: list[bytes] = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    payloads: list[Any] = field(default_factory=list)    # buffers (put only)


@dataclass
class Reply:
    req_id: int
    ok: bool
    err: str = ""
    msg: str = ""
    found: list[bool] = field(default_factory=list)     # get / exists
    stored: list[bool] = field(default_factory=list)    # put
    crcs: list[int] = field(default_factory=list)       # get: one per found block
    payloads: list[Any] = field(default_factory=list)   # get: one per found block
    body: dict = field(default_factory=dict)            # health / stats / delete


def _pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _unpack(buf) -> dict:
    n = len(buf)
    if n == 0 or n > MAX_HEADER_BYTES:
        raise ProtocolError(E_MALFORMED if n == 0 else E_TOO_LARGE, f"header of {n} bytes")
    try:
        obj = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as e:
        raise ProtocolError(E_MALFORMED, f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_MALFORMED, "header is not a map")
    return obj


def _int(d: dict, name: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    v = d.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(E_MALFORMED, f"{name} must be an int in [{lo}, {hi}]")
    return v


def _keys(d: dict, max_keys: int) -> list[bytes]:
    keys = d.get("keys")
    if not isinstance(keys, list):
        raise ProtocolError(E_MALFORMED, "keys must be a list")
    if len(keys) > max_keys:
        raise ProtocolError(E_TOO_LARGE, f"{len(keys)} keys > {max_keys}")
    for k in keys:
        if type(k) is not bytes or len(k) != KEY_BYTES:
            raise ProtocolError(E_MALFORMED, f"keys must be bytes of length {KEY_BYTES}")
    return keys


def _crc_list(d: dict, name: str, n: int) -> list[int]:
    crcs = d.get(name)
    if not isinstance(crcs, list) or len(crcs) != n or \
            not all(type(c) is int and 0 <= c < 2**32 for c in crcs):
        raise ProtocolError(E_MALFORMED, f"{name} must be {n} uint32 values")
    return crcs


def _bools(d: dict, name: str, n: int) -> list[bool]:
    v = d.get(name)
    if not isinstance(v, list) or len(v) != n or not all(type(b) is bool for b in v):
        raise ProtocolError(E_MALFORMED, f"{name} must be {n} booleans")
    return v


def payload_crcs(bufs: Sequence[Any]) -> list[int]:
    """CRC32C of each payload; several at once on the native thread pool."""
    if len(bufs) < 2:
        return [native.crc32c(b) for b in bufs]
    arrs = [np.frombuffer(b, dtype=np.uint8) for b in bufs]     # kept alive across the call
    addrs = np.array([a.ctypes.data for a in arrs], dtype=np.uint64)
    lens = np.array([a.nbytes for a in arrs], dtype=np.uint64)
    return native.crc32c_spans(addrs, lens, within=arrs).tolist()


def copy_payloads(dsts: Sequence[Any], srcs: Sequence[Any]) -> list[int]:
    """dsts[i][:] = srcs[i] for every block; returns the CRC32C of each block copied.

    One pass over the bytes (each piece is checksummed while still in cache),
    several blocks at once on the native thread pool.
    """
    if not dsts:
        return []
    d = [np.frombuffer(x, dtype=np.uint8) for x in dsts]        # kept alive across the call
    s = [np.frombuffer(x, dtype=np.uint8) for x in srcs]
    for a, b in zip(d, s):
        if a.nbytes != b.nbytes or not a.flags.writeable:
            raise ValueError(f"destination of {a.nbytes} bytes (writable: {a.flags.writeable}) "
                             f"for a block of {b.nbytes}")
    return native.copy_crc_spans(np.array([a.ctypes.data for a in s], dtype=np.uint64),
                                  np.array([a.ctypes.data for a in d], dtype=np.uint64),
                                  np.array([a.nbytes for a in d], dtype=np.uint64), within=[*s, *d]).tolist()


# ---- requests --------------------------------------------------------------------
def encode_request(op: str, req_id: int, ns: str, *, keys: Sequence[bytes] = (),
                   block_bytes: int = 0, crcs: Sequence[int] = ()) -> bytes:
    d: dict = {"v": VERSION, "op": op, "id": req_id, "ns": ns}
    if op in KEYED_OPS:
        d["keys"] = list(keys)
    if op in ("get", "put"):
        d["bb"] = block_bytes
    if op == "put":
        d["crcs"] = list(crcs)
    return _pack(d)


def peek_id(header) -> int | None:
    """The request id of a header, if one can be read (to address an error reply)."""
    try:
        d = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception:  # any garbage: no id to echo
        return None
    v = d.get("id") if isinstance(d, dict) else None
    return v if type(v) is int and 0 <= v < 2**64 else None


def decode_request(frames: Sequence[Any], limits: Limits = Limits()) -> Request:
    """Validate a request's frames (header first); raise ProtocolError on any violation."""
    if not frames:
        raise ProtocolError(E_MALFORMED, "empty message")
    if len(frames) > limits.max_keys + 1:
        raise ProtocolError(E_TOO_LARGE, f"{len(frames)} frames > {limits.max_keys + 1}")
    total = sum(len(f) for f in frames)
    if total > limits.max_request_bytes:
        raise ProtocolError(E_TOO_LARGE, f"request of {total} bytes > {limits.max_request_bytes}")
    d = _unpack(frames[0])
    v = d.get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(E_VERSION, f"protocol version {v!r} not supported; this server speaks {VERSION}")
    req_id = _int(d, "id")
    op = d.get("op")
    if op not in OPS:
        raise ProtocolError(E_MALFORMED, f"op {op!r} is not one of {', '.join(OPS)}")
    ns = d.get("ns")
    if not isinstance(ns, str) or not 0 < len(ns) <= MAX_NAMESPACE_CHARS:
        raise ProtocolError(E_MALFORMED, f"ns must be a string of 1..{MAX_NAMESPACE_CHARS} chars")
    req = Request(op, req_id, ns)
    payloads = list(frames[1:])
    if op in KEYED_OPS:
        req.keys = _keys(d, limits.max_keys)
    if op in ("get", "put"):
        req.block_bytes = _int(d, "bb", 1, limits.max_block_bytes)
    if op == "put":
        n = len(req.keys)
        req.crcs = _crc_list(d, "crcs", n)
        if len(payloads) != n:
            raise ProtocolError(E_MALFORMED, f"{len(payloads)} payload frames for {n} keys")
        for p in payloads:
            if len(p) != req.block_bytes:
                raise ProtocolError(E_MALFORMED, f"payload of {len(p)} bytes, block_bytes is {req.block_bytes}")
        req.payloads = payloads
    elif payloads:
        raise ProtocolError(E_MALFORMED, f"{op} carries no payload frames")
    return req


# ---- replies ---------------------------------------------------------------------
def encode_reply(req_id: int, **fields: Any) -> bytes:
    d = {"v": VERSION, "id": req_id, "ok": True}
    d.update(fields)
    return _pack(d)


def encode_error(req_id: int | None, code: str, message: str) -> bytes:
    return _pack({"v": VERSION, "id": req_id, "ok": False, "err": code, "msg": message[:500]})


def decode_reply(frames: Sequence[Any], req_id: int, op: str, num_keys: int = 0,
                 block_bytes: int = 0) -> Reply:
    """Validate a reply to request ``req_id``; raise ProtocolError if it is not one."""
    if not frames:
        raise ProtocolError(E_MALFORMED, "empty reply")
    d = _unpack(frames[0])
    if d.get("v") != VERSION:
        raise ProtocolError(E_VERSION, f"reply version {d.get('v')!r}")
    if d.get("id") != req_id or type(d.get("id")) is not int:
        raise ProtocolError(E_MALFORMED, f"reply to request {d.get('id')!r}, expected {req_id}")
    ok = d.get("ok")
    if type(ok) is not bool:
        raise ProtocolError(E_MALFORMED, "ok must be a boolean")
    payloads = list(frames[1:])
    if not ok:
        err, msg = d.get("err"), d.get("msg", "")
        if not isinstance(err, str) or not isinstance(msg, str) or payloads:
            raise ProtocolError(E_MALFORMED, "bad error reply")
        return Reply(req_id, False, err=err, msg=msg)
    rep = Reply(req_id, True)
    if op in ("get", "exists"):
        rep.found = _bools(d, "found", num_keys)
    if op == "get":
        n = sum(rep.found)
        rep.crcs = _crc_list(d, "crcs", n)
        if len(payloads) != n or any(len(p) != block_bytes for p in payloads):
            raise ProtocolError(E_MALFORMED, f"{len(payloads)} payloads for {n} found blocks "
                                             f"of {block_bytes} bytes")
        rep.payloads = payloads
    elif payloads:
        raise ProtocolError(E_MALFORMED, f"{op} reply carries payload frames")
    if op == "put":
        rep.stored = _bools(d, "stored", num_keys)
    if op in ("delete", "health", "stats", "drop"):
        body = d.get("body")
        if not isinstance(body, dict):
            raise ProtocolError(E_MALFORMED, "body must be a map")
        rep.body = body
    return rep

"""kvtier.native.ranges: the native span ops touch registered host memory only (issue 19)."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import native
from kvtier.errors import ConfigError
from kvtier.native import ranges
from kvtier.native.ranges import UnregisteredMemoryError

from tests.native.test_ops import POISON, poisoned, u64


def buf_addr(a: np.ndarray) -> int:                   # an address, registered by nobody
    return a.ctypes.data


@pytest.fixture(autouse=True, params=["extension", "numpy"])
def check_path(request, monkeypatch):
    """Every test runs on the extension's span check (where built) and on the numpy one."""
    if request.param == "numpy":
        monkeypatch.setattr(ranges, "_fast", None)
    elif ranges._fast is None:
        pytest.skip("native extension not in use")


def test_unmapped_address_is_an_error_naming_span_argument_and_address():
    src = poisoned(64)
    with ranges.register(src, owner="src"):
        with pytest.raises(UnregisteredMemoryError) as info:
            native.copy_spans(u64([buf_addr(src), buf_addr(src)]), u64([0x10000, 0xDEAD0000]), u64([0, 8]))
    msg = str(info.value)
    assert "copy_spans: span 1: dst_addrs 0xdead0000 + 8 bytes is in no registered memory range" in msg
    assert isinstance(info.value, ValueError)


def test_span_running_past_a_registered_buffer_names_it_in_every_mode():
    a, b = poisoned(4096), poisoned(4096)
    with ranges.register(a, owner="arena"), ranges.register(b, owner="other"):
        for mode in ("strict", "known"):
            with ranges.enforcing(mode), pytest.raises(UnregisteredMemoryError, match=r"runs 1 bytes past .*arena"):
                native.copy_spans(u64([buf_addr(a) + 1]), u64([buf_addr(b)]), u64([4096]))
        with ranges.enforcing("off"):          # off: the caller is trusted (here, rightly)
            native.copy_spans(u64([buf_addr(a)]), u64([buf_addr(b)]), u64([4096]))
    assert (b == POISON).all()


def test_known_mode_lets_unregistered_memory_through_and_counts_it():
    a, b = poisoned(64), np.zeros(64, dtype=np.uint8)
    before = ranges.REGISTRY.num_unregistered_spans
    with ranges.enforcing("known"):
        native.copy_spans(u64([buf_addr(a)]), u64([buf_addr(b)]), u64([64]))
    assert (b == POISON).all()
    assert ranges.REGISTRY.num_unregistered_spans == before + 2


def test_buffers_of_the_call_count_as_registered():
    a, b = poisoned(100), np.zeros(100, dtype=np.uint8)
    native.copy_spans(u64([buf_addr(a)]), u64([buf_addr(b)]), u64([100]), within=[a, b])
    assert (b == POISON).all()
    crcs = native.crc32c_spans(u64([buf_addr(a)] * 20), u64([100] * 20), within=[(buf_addr(a), 100)])
    assert crcs.tolist() == [native.crc32c(a)] * 20
    with pytest.raises(UnregisteredMemoryError, match="span 0: addrs"):
        native.crc32c_spans(u64([buf_addr(a)]), u64([101]), within=[a])


def test_overlapping_and_adjacent_registrations_merge():
    a = poisoned(8192)
    low, high, mid = a[:4096], a[4096:], a[1000:5000]       # views live as long as their registration
    with ranges.register(low, owner="low"), ranges.register(high, owner="high"), \
            ranges.register(mid, owner="middle"):
        assert [(n, o) for _, n, o in ranges.REGISTRY.ranges() if "low" in o] == [(8192, "low + middle + high")]
        native.crc32c_spans(u64([buf_addr(a)]), u64([8192]))         # across the seam: one range
    with pytest.raises(UnregisteredMemoryError):
        native.crc32c_spans(u64([buf_addr(a)]), u64([8192]))


def test_registration_ends_with_close_or_with_the_buffer():
    a = np.zeros(4096, dtype=np.uint8)
    reg = ranges.register(a, owner="short-lived")
    addr = buf_addr(a)
    assert any(s == addr for s, _, _ in ranges.REGISTRY.ranges())
    reg.close()
    reg.close()
    assert not any(s == addr for s, _, _ in ranges.REGISTRY.ranges())
    ranges.register(a, owner="collected")
    del a
    gc.collect()
    assert not any(s == addr for s, _, _ in ranges.REGISTRY.ranges())


GC_INSIDE_REBUILD = """
import gc
import numpy as np
from kvtier.native import ranges
gc.set_threshold(1)          # collect on (almost) every allocation: inside every rebuild too
class Cycle:
    pass
for i in range(300):
    c = Cycle(); c.me = c; c.buf = np.zeros(16, np.uint8)
    ranges.register(c.buf, owner="in a cycle")
    del c                    # only the collector frees it, whenever it next runs
    ranges.register(bytearray(8), owner="other").close()
gc.collect()
print(len(ranges.REGISTRY.ranges()))
"""


def test_a_buffer_collected_while_the_registry_rebuilds_does_not_deadlock():
    """The collector may free a registered buffer inside register()/close() of another
    one, on the thread that holds the registry's lock; its range must still go."""
    import subprocess, sys
    from tests.helpers import ROOT
    try:
        out = subprocess.run([sys.executable, "-c", GC_INSIDE_REBUILD], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the range registry deadlocked on a finalizer run by the garbage collector")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_tensor_views_register_their_whole_extent():
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 8, dtype=torch.float32)
    col = t[:, 1]                                     # strided: 4 floats spread over 13 floats
    assert ranges.buffer_range(col) == (col.data_ptr(), (3 * 8 + 1) * 4)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="host memory"):
            ranges.buffer_range(t.cuda())


def test_every_raw_address_op_is_checked(tmp_path):
    fd_path = tmp_path / "f"
    fd_path.write_bytes(bytes(8192))
    import os
    fd = os.open(fd_path, os.O_RDWR)
    wild, o = u64([0xDEAD000]), np.zeros(1, dtype=np.int64)
    try:
        for name, args in [("copy_spans", (wild, wild + 8192, u64([8]))),
                           ("copy_crc_spans", (wild, wild + 8192, u64([8]))),
                           ("crc32c_spans", (wild, u64([8]))),
                           ("pread_spans", (fd, o, wild, u64([8]))), ("pwrite_spans", (fd, o, wild, u64([8]))),
                           ("pread_blocks", (fd, o, wild, 4096, 4096)), ("pwrite_blocks", (fd, o, wild, 4096, 4096))]:
            with pytest.raises(UnregisteredMemoryError, match=f"^{name}: span 0"):
                getattr(native, name)(*args)
    finally:
        os.close(fd)
    assert fd_path.read_bytes() == bytes(8192)


def test_mode_comes_from_the_environment_and_is_checked():
    import subprocess, sys
    from tests.helpers import ROOT
    code = "from kvtier.native import ranges; print(ranges.mode())"
    for value, want in [("known", "known"), ("", "strict"), ("OFF", "off")]:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={"KVTIER_NATIVE_RANGES": value, "PATH": "", "PYTHONPATH": str(ROOT)})
        assert out.stdout.strip() == want, out.stderr
    with pytest.raises(ConfigError, match="one of strict, known, off"):
        ranges.set_mode("sometimes")


@given(st.lists(st.tuples(st.integers(1, 2**20), st.integers(0, 4096)), max_size=8),
       st.lists(st.tuples(st.integers(0, 2**20 + 8192), st.integers(0, 8192)), min_size=1, max_size=16),
       st.sampled_from([None, 0, 1, 4096, 2**64 - 1]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_extension_check_agrees_with_numpy(regs, spans, one_len):
    fast = getattr(native._ext, "_first_outside", None)
    if fast is None:
        return
    snap = ranges._Snapshot([(a, a + n, "r") for a, n in regs if n])
    addrs = np.array([a for a, _ in spans], dtype=np.uint64)
    lens = np.array([n for _, n in spans], dtype=np.uint64) if one_len is None else np.uint64(one_len)
    ok = ranges._covered(snap.starts, snap.ends0, addrs, lens)
    want = int(np.flatnonzero(~ok)[0]) if not ok.all() else -1
    assert fast(snap.starts, snap.ends0, addrs, lens if one_len is None else one_len) == want

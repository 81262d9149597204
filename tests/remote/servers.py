"""Real server processes for the remote-tier tests: kvtier servers and redis-server, and a
raw ZMTP peer that misbehaves as libzmq never would.

Every process started here is bounded (a start-up deadline) and killed by the
fixture that started it; ports are free loopback ports picked by the kernel.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time


from tests.helpers import ROOT

START_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ServerProc:
    """One ``python -m kvtier serve`` process; restartable on the same port."""

    def __init__(self, args: list[str], host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self._auto_port = port is None
        self.port = port or free_port(host)
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.output = ""

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def start(self, expect_ok: bool = True) -> "ServerProc":
        for _ in range(5):
            try:
                started = self._start(expect_ok)
                self._auto_port = False        # restarts keep the endpoint clients know
                return started
            except RuntimeError:
                # a port picked by free_port() can be taken (e.g. as some client's
                # ephemeral port) before the server binds it: pick another
                if not (self._auto_port and "Address already in use" in self.output):
                    raise
                self.port = free_port(self.host)
        return self._start(expect_ok)

    def _start(self, expect_ok: bool) -> "ServerProc":
        self.output = ""
        cmd = [sys.executable, "-m", "kvtier", "serve", "--bind", self.endpoint, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=str(ROOT))
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while expect_ok and not self._listening.wait(0.05):
            if not self._reader.is_alive() or time.monotonic() > deadline:   # exited, or too slow
                self.kill()
                raise RuntimeError(f"server did not start: {self.output}")
        return self

    def _read(self, proc) -> None:
        for raw in proc.stdout:                # until the process closes its end
            line = raw.decode(errors="replace")
            self.output += line
            if "listening on" in line:
                self._listening.set()

    def wait_exit(self, timeout: float = 20.0) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._reader.join(5)
            self.proc.stdout.close()


class RawPeer:
    """A ZMTP 3.0 DEALER spoken over a plain TCP socket (NULL mechanism): it can send the
    frames of a message one by one, and stop before the last, as libzmq never would."""

    def __init__(self, endpoint: str):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
        prop = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        body = b"\x05READY" + prop
        self.sock.sendall(bytes([0x04, len(body)]) + body)
        # libzmq takes frames only once its own READY is out: wait for its greeting and READY
        self._read(64)
        flags = self._read(1)[0]
        size = struct.unpack(">Q", self._read(8))[0] if flags & 0x02 else self._read(1)[0]
        self._read(size)

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise ConnectionError("the server closed the connection during the handshake")
            out += got
        return out

    def frame(self, payload, more: bool = True) -> bool:
        """Send one frame; False once the server has closed the connection."""
        n = len(payload)
        flags = (1 if more else 0) | (2 if n > 255 else 0)
        head = bytes([flags]) + (struct.pack(">Q", n) if n > 255 else bytes([n]))
        try:
            self.sock.sendall(head)
            self.sock.sendall(payload)
            return True
        except OSError:
            return False

    def closed_by_server(self, timeout: float) -> bool:
        """True once the server closes the connection (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(1 << 16):      # replies, if any, then the end
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    for _ in range(100):
        p = free_port()
        if p + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair for a redis cluster node")


class RedisProc:
    def __init__(self, cluster: bool = False):
        self.port = _cluster_port() if cluster else free_port()
        self.dir = None
        self.cluster = cluster
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, tmp_dir: str) -> "RedisProc":
        import redis
        self.dir = tmp_dir
        cmd = [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", tmp_dir, "--protected-mode", "no"]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(tmp_dir, "nodes.conf")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        if self.cluster:           # one node owning every slot is a whole cluster
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while client.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError("redis cluster did not come up")
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

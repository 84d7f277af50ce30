"""Two "machines" for the multi-node tests: network namespaces made by the test (``ip netns``), joined by one veth
pair on a private /24 of their own and routed nowhere else; host A also runs dedicated PostgreSQL and Redis
servers bound to its address. Both see this machine's filesystem: that is the shared storage (HDM_RUNS_DIR,
models, outputs) the deployment guide asks for. Everything is removed afterwards, also when a test fails."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.procutil import die_with_parent

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """The calling thread in namespace ``ns`` (sockets it opens stay there), back to where it was after."""
    back = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{ns}")
        yield
    finally:
        if _libc.setns(back, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(back)


def preexec(ns: str, sig: int = signal.SIGTERM, user: str | None = None) -> Callable[[], None]:
    """A child that runs in namespace ``ns`` (as ``user``) and gets ``sig`` when its parent dies."""
    die = die_with_parent(sig)
    ids = None
    if user is not None:
        import pwd

        pw = pwd.getpwnam(user)
        ids = (pw.pw_uid, pw.pw_gid)

    def _run() -> None:  # pragma: no cover (between fork and exec)
        _setns(f"/run/netns/{ns}")
        die()
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])

    return _run


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route or address of this machine touches."""
    used = [
        ipaddress.ip_network(tok, strict=False)
        for line in subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout.splitlines()
        + subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout.splitlines()
        for tok in line.split()
        if "/" in tok and tok[0].isdigit()
    ]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(16, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free private /24 found")


@dataclass
class Host:
    name: str  # "A" / "B"
    ns: str
    addr: str
    ifname: str

    def net_inode(self) -> int:
        return os.stat(f"/run/netns/{self.ns}").st_ino


@dataclass
class Hosts:
    a: Host
    b: Host
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pg_port: int = 0
    redis_port: int = 0

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.a.addr}:{self.pg_port}/hdm"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.a.addr}:{self.redis_port}/0"


def _wait_port(host: Host, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    with inside(host.ns):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((host.addr, port), timeout=1):
                return
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host.addr}:{port}")


def _start(cmd: list[str], log: Path, pre: Callable[[], None]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre
    )


@contextlib.contextmanager
def two_hosts(logdir: Path) -> Iterator[Hosts]:
    """Namespaces A and B on a veth pair; PostgreSQL and Redis listening on A's address only."""
    if os.geteuid() != 0:
        raise RuntimeError(
            "the multi-host tests create network namespaces (ip netns, veth): run them as root (CI does)"
        )
    tag = secrets.token_hex(3)
    net = _free_subnet()
    addr_a, addr_b = (str(net.network_address + i) for i in (1, 2))
    a = Host("A", f"hdm{tag}a", addr_a, f"hdm{tag}va")
    b = Host("B", f"hdm{tag}b", addr_b, f"hdm{tag}vb")
    pgdir = Path(tempfile.mkdtemp(prefix="hdm-netns-pg-"))
    hosts = Hosts(a, b)
    try:
        for h in (a, b):
            _sh("ip", "netns", "add", h.ns)
        _sh("ip", "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for h in (a, b):
            _sh("ip", "link", "set", h.ifname, "netns", h.ns)
            _sh("ip", "-n", h.ns, "addr", "add", f"{h.addr}/{net.prefixlen}", "dev", h.ifname)
            _sh("ip", "-n", h.ns, "link", "set", h.ifname, "up")
            _sh("ip", "-n", h.ns, "link", "set", "lo", "up")
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        os.chown(pgdir, *_ids("postgres"))
        subprocess.run(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", str(bindir / "initdb"),
             "-D", str(pgdir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
            check=True, capture_output=True,
        )  # fmt: skip
        with (pgdir / "data" / "pg_hba.conf").open("a") as f:
            f.write(f"host all all {net} trust\n")
        hosts.pg_port, hosts.redis_port = random.randint(20000, 29000), random.randint(30000, 39000)
        pg = _start(
            [str(bindir / "postgres"), "-D", str(pgdir / "data"), "-k", str(pgdir), "-h", a.addr,
             "-p", str(hosts.pg_port), "-c", "fsync=off", "-c", "max_connections=200"],
            logdir / "postgres.log",
            preexec(a.ns, signal.SIGTERM, user="postgres"),
        )  # fmt: skip
        hosts.procs.append(pg)
        redis = _start(
            ["redis-server", "--bind", a.addr, "--port", str(hosts.redis_port), "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            logdir / "redis.log",
            preexec(a.ns, signal.SIGTERM),
        )  # fmt: skip
        hosts.procs.append(redis)
        _wait_port(a, hosts.redis_port, redis, "redis-server")
        _wait_port(a, hosts.pg_port, pg, "postgres")
        subprocess.run(
            [str(bindir / "createdb"), "-h", str(pgdir), "-p", str(hosts.pg_port), "-U", "postgres", "hdm"],
            check=True, capture_output=True, preexec_fn=preexec(a.ns, user="postgres"),
        )  # fmt: skip
        yield hosts
    finally:
        for p in hosts.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM if p is hosts.procs[0] else signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for h in (a, b):  # deleting a namespace deletes the veth end inside it, and with it the pair
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        shutil.rmtree(pgdir, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def leftovers(hosts: Hosts) -> list[str]:
    """What of the test's network is still there (after cleanup: nothing)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [
        x
        for h in (hosts.a, hosts.b)
        for x in (h.ns, h.ifname)
        if x in names.split() or f" {x}@" in links or f" {x}:" in links
    ]

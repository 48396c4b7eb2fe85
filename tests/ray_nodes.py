"""A real multi-node Ray cluster on this machine, for tests: token auth on, dashboard on 127.0.0.1.

Each node is a ``ray start --block`` process in its own process group, so the test stops exactly
the processes it started (other Ray instances may run on the same machine: never ``ray stop``,
never kill by name). Stopping sends SIGTERM to the ``ray start`` processes, waits for them to
exit (no drain: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0), then kills whatever is left of each group.

Nodes are started with ``--node-ip-address=127.0.0.1``, but Ray 2.60 resolves a loopback node
address to the machine's own (``resolve_ip_for_localhost``) and its GCS / raylet ports listen on
every interface; only the dashboard honours 127.0.0.1. Token authentication guards the rest.
No port is chosen by probing: every server that can binds port 0 itself and reports the port it
got (GCS, dashboard, raylet, object manager, agents, metrics; workers bind their own with no port
window), and the address is read from ``ray start``'s own output. The one port Ray cannot take as
0, the head's Ray Client server, is reserved below the kernel's ephemeral range (where the OS never
hands out ports) under a lock file held for the cluster's life, so two test clusters never pick the
same one (``reserve_port``)."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time

VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up here: the child of a threaded parent should only make the call


def die_with_parent() -> None:
    """preexec_fn (Linux): the child gets SIGTERM if the test process dies, so even a killed
    pytest leaves no cluster behind (``ray start --block`` then drains and stops its node)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


PORT_LOCKS = "/tmp/shardsmith-test-ports"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortReservation:
    """A TCP port below the ephemeral range, held under ``PORT_LOCKS/PORT.lock`` (flock) until
    ``release``: the OS never assigns it to a ``bind(0)`` or an outgoing connection, and every
    test helper that reserves ports skips a locked one, so it stays free for the server it is
    given to. Ray's default ports (6379, 8265, 10001, 10002-19999, 52365) are outside the range."""

    def __init__(self, low: int = 20000, high: int | None = None, tries: int = 200):
        import fcntl

        high = min(high or 32767, _ephemeral_low() - 1)
        os.makedirs(PORT_LOCKS, exist_ok=True)
        rnd = random.Random(os.getpid() ^ time.monotonic_ns())
        for _ in range(tries):
            port = rnd.randint(low, high)
            fd = os.open(os.path.join(PORT_LOCKS, f"{port}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            with socket.socket() as s:  # not locked, but maybe bound by something else: skip it
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    os.close(fd)
                    continue
            self.port, self._fd = port, fd
            return
        raise RuntimeError(f"no free port to reserve in {low}-{high}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


def write_token(path: str) -> str:
    """A fresh Ray auth token in a 0600 file (what ``RAY_AUTH_TOKEN_PATH`` points to)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def cluster_env(token_path: str, extra: dict | None = None) -> dict:
    """Environment for the nodes and the clients: token auth on, the venv first on PATH (the
    job's ``python`` is whatever comes first there), no leftover Ray address or token."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_HEADERS")}
    # The drain on SIGTERM is for Serve replicas to quiesce (Ray's default waits up to 30 s); there
    # is no Serve here and the tests stop nodes after their jobs ended: 0 turns it off (10 s drains
    # made each cluster's teardown take 13-15 s).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    env.update(extra or {})
    return env


class LocalRayCluster:
    """``with LocalRayCluster(tmp, env) as c: c.start_head(...); c.add_node(...)``: stopped on exit,
    whatever happened."""

    def __init__(self, log_dir: str, env: dict, object_store_bytes: int = 150 * 1024**2):
        self.log_dir = log_dir
        self.env = env
        self.object_store_bytes = object_store_bytes
        self.nodes: list[tuple[subprocess.Popen, object]] = []
        self.killed: set[int] = set()  # pids of nodes killed on purpose (kill_node)
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None
        # Unix socket paths are limited to ~107 bytes: keep the session root short.
        self.temp_dir = f"/tmp/ss-{secrets.token_hex(4)}"
        self.temp_dirs = [self.temp_dir]
        self.reservations: list[PortReservation] = []

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _node_ports(self) -> list[str]:
        """Every port 0: each server binds its own and Ray passes the ports on (port files in the
        session folder, the GCS's node table); workers bind any free port (no window)."""
        return ["--node-ip-address=127.0.0.1", "--node-manager-port=0", "--object-manager-port=0",
                "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--metrics-export-port=0",
                "--runtime-env-agent-port=0", "--min-worker-port=0", "--max-worker-port=0",
                f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats", "--block"]

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen([RAY, "start", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.nodes.append((proc, log))
        return proc

    def start_head(self, num_cpus: float = 1, resources: dict | None = None, timeout: float = 90) -> str:
        # The head's GCS and dashboard bind port 0; ``ray start`` prints the addresses they got.
        # Ray Client's server needs a real port: one reserved for the cluster's life.
        client = PortReservation()
        self.reservations.append(client)
        args = ["--head", "--port=0", "--dashboard-host=127.0.0.1", "--dashboard-port=0",
                f"--ray-client-server-port={client.port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                f"--temp-dir={self.temp_dir}", *self._node_ports()]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self._spawn(args, "head")
        gcs_port, self.dashboard_url = self._read_head_addresses(timeout)
        self.gcs_address = f"127.0.0.1:{gcs_port}"  # the GCS listens on every interface
        self.wait_for_dashboard(timeout)
        self.wait_for_nodes(1, timeout)
        return self.dashboard_url

    def _read_head_addresses(self, timeout: float) -> tuple[int, str]:
        """(GCS port, dashboard URL) as ``ray start --head`` prints them once its servers are up."""
        import re

        proc, log = self.nodes[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with open(log.name, "rb") as f:
                text = re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode(errors="replace"))
            gcs = re.search(r"ray start --address='[^':]+:(\d+)'", text)
            dash = re.search(r"RAY_API_SERVER_ADDRESS='(http://127\.0\.0\.1:\d+)'", text)
            if gcs and dash:
                return int(gcs.group(1)), dash.group(1)
            time.sleep(0.5)
        raise TimeoutError(f"ray start --head printed no addresses after {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def add_node(self, num_cpus: float = 1, resources: dict | None = None, timeout: float = 90) -> None:
        assert self.gcs_address, "start_head first"
        # Its own temp dir: nodes sharing one machine would otherwise share the session folder, and
        # one node's runtime-env garbage collection would delete the job's working dir under the other.
        temp_dir = f"{self.temp_dir}-n{len(self.nodes)}"
        self.temp_dirs.append(temp_dir)
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
                *self._node_ports()]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self._spawn(args, f"node{len(self.nodes)}")
        self.wait_for_nodes(len([p for p, _ in self.nodes if p.pid not in self.killed]), timeout)

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL node ``index`` the way a lost machine goes (spot preemption): its ``ray start``
        process, its raylet and every worker and agent below them, at once. Returns the pids."""
        proc, _ = self.nodes[index]
        self.killed.add(proc.pid)
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
        return pids

    def _check_alive(self) -> None:
        for proc, log in self.nodes:
            if proc.poll() is not None and proc.pid not in self.killed:
                raise RuntimeError(f"ray start exited with {proc.returncode}: see {log.name}:\n{self.logs()[-3000:]}")

    def _get(self, path: str, timeout: float = 10) -> dict:
        """GET on the head's dashboard API, with the cluster's token (the API refuses requests
        without it)."""
        import urllib.request

        with open(self.env["RAY_AUTH_TOKEN_PATH"]) as f:
            token = f.read().strip()
        req = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the GCS sees them (State API): node_id, is_head_node, resources_total."""
        try:
            data = self._get("/api/v0/nodes?limit=100")
        except OSError:
            return []
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            self._check_alive()
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{len(nodes)} of {n} Ray nodes alive after {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def wait_for_exactly(self, n: int, timeout: float = 120) -> None:
        """Until the GCS counts exactly ``n`` alive nodes (a killed node is declared dead only after
        its health checks fail)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == n:
                return
            time.sleep(1)
        raise TimeoutError(f"{len(self.alive_nodes())} Ray nodes alive, expected {n}, after {timeout:.0f} s")

    def wait_for_dashboard(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5)
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without a token): it is up
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray dashboard at {self.dashboard_url} not up after {timeout:.0f} s")

    def logs(self) -> str:
        text = []
        for _, log in self.nodes:
            try:
                with open(log.name, "rb") as f:
                    text.append(f"--- {os.path.basename(log.name)}\n" + f.read().decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(text)

    def stop(self, drain_timeout: float = 35) -> None:
        """SIGTERM every node (workers first), let them drain together, then kill what is left of
        each process group and wait until the groups are empty."""
        import shutil

        for proc, _ in reversed(self.nodes):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + drain_timeout
        for proc, log in reversed(self.nodes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            # The group's other processes die (and are reaped by init) a moment later.
            gone_by = time.monotonic() + 20
            while group_alive(proc.pid) and time.monotonic() < gone_by:
                time.sleep(0.2)
            log.close()
        self.nodes.clear()
        for r in self.reservations:
            r.release()
        self.reservations.clear()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (no name matching across the machine)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

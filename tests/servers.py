"""Servers of a test's own: a PostgreSQL cluster and a RabbitMQ node to stop, kill and restart.

Outage tests must not touch the machine's shared servers (5432, 5672) that other tests and
other runs use, so they start their own here, on free ports and in data directories under
the test's temporary directory, and remove them afterwards. Both run as their service
users (PostgreSQL refuses root), from the Debian packages' binaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql")
RABBIT_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
COMMAND_TIMEOUT = 120


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _node_name(prefix: str) -> str:
    # Unique per node: a node left running by a crashed run cannot clash with a new one.
    return f"{prefix}-{uuid.uuid4().hex[:8]}@localhost"


def _own(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of one test: `start()`, `stop()` (immediate), `close()`.

    It listens on loopback, and also on `extra_address` when given (say the host side of a
    test's network namespaces), trusting clients of `extra_network` there.
    """

    root: Path
    port: int = field(default_factory=free_port)
    extra_address: str | None = None
    extra_network: str | None = None
    # More server settings (`-c name=value`), e.g. TCP keepalives.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{name}"

    @property
    def _data(self) -> Path:
        return self.root / "data"

    def _pg(self, tool: str) -> str:
        versions = sorted(PG_BIN.glob("*/bin/" + tool))
        if not versions:
            pytest.fail(f"PostgreSQL's {tool} is not installed under {PG_BIN}")
        return str(versions[-1])

    def _as_postgres(self, *argv: str) -> str:
        return _run("runuser", "-u", "postgres", "--", *argv)

    def init(self) -> PrivatePostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        _own(self.root, "postgres")
        self._as_postgres(
            self._pg("initdb"), "-D", str(self._data), "--auth=trust", "-U", "postgres", "-N"
        )
        if self.extra_network:
            with (self._data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self.extra_network} trust\n")
        return self.start()

    def start(self) -> PrivatePostgres:
        addresses = ",".join(filter(None, ["127.0.0.1", self.extra_address]))
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={addresses} -c fsync=off "
            "-c max_connections=200"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._as_postgres(
            self._pg("pg_ctl"), "-D", str(self._data), "-l", str(self.root / "log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; `immediate` is a crash as far as clients can tell."""
        self._as_postgres(self._pg("pg_ctl"), "-D", str(self._data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        if (self._data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


PGBOUNCER = Path("/usr/sbin/pgbouncer")


@dataclass
class PrivatePgBouncer:
    """A pgbouncer of one test in front of `server`, on its own port and config directory.

    `pool_mode` is pgbouncer's (transaction pooling is the one that changes what a client
    may do); `pool_size` is the server connections it opens per database and user. It runs
    as the postgres user (pgbouncer refuses root) and trusts every client, as the server does.
    """

    root: Path
    server: PrivatePostgres
    pool_mode: str = "transaction"
    pool_size: int = 20
    port: int = field(default_factory=free_port)

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> PrivatePgBouncer:
        if not PGBOUNCER.exists():
            pytest.fail(f"pgbouncer is not installed ({PGBOUNCER}); scripts/pgbouncer.sh does it")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\nadmin_users = postgres\n"
            f"logfile = {self.root / 'log'}\npidfile = {self.root / 'pid'}\n"
        )
        for path in (self.root, *self.root.iterdir()):
            _own(path, "postgres")
        config = str(self.root / "pgbouncer.ini")
        _run("runuser", "-u", "postgres", "--", str(PGBOUNCER), "-d", config)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not _accepts(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self.log()}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        pidfile = self.root / "pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + COMMAND_TIMEOUT
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class PrivateRabbit:
    """A RabbitMQ node of one test, with its own node name, ports and data directory.

    `stop_app()` closes its listener and every connection, as an outage does; `kill()` is
    `kill -9` of the node; `start()` brings either back.
    """

    root: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: _node_name("txflow-test"))
    # Also listen there (say the host side of a test's network namespaces), as on loopback.
    extra_address: str | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
        }

    def ctl(self, *args: str, check: bool = True) -> str:
        return _run("rabbitmqctl", "-n", self.name, *args, check=check)

    def init(self) -> PrivateRabbit:
        if not RABBIT_SERVER.exists():
            pytest.fail(f"RabbitMQ is not installed ({RABBIT_SERVER} is missing)")
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        listeners = [f"listeners.tcp.default = 127.0.0.1:{self.port}"]
        if self.extra_address:
            listeners.append(f"listeners.tcp.extra = {self.extra_address}:{self.port}")
        (self.root / "rabbitmq.conf").write_text("\n".join(listeners) + "\nloopback_users = none\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        for path in (self.root, *self.root.iterdir()):
            _own(path, "rabbitmq")
        return self.start()

    def start(self) -> PrivateRabbit:
        """Start the node (if it is down) and its app; returns once it accepts connections."""
        if not self._node_up():
            _run("runuser", "-u", "rabbitmq", "--", str(RABBIT_SERVER), "-detached",
                 env=self._env())  # fmt: skip
            deadline = time.monotonic() + COMMAND_TIMEOUT
            while not self._node_up():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ node {self.name} did not come up")
                time.sleep(0.5)
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", str(COMMAND_TIMEOUT))
        return self

    def _node_up(self) -> bool:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, "-q", "ping"],
            capture_output=True, timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def stop(self) -> None:
        """Stop the whole node (its Erlang VM too), as a host shutdown does."""
        self.ctl("stop")
        while self._node_up():
            time.sleep(0.2)

    def join(self, other: PrivateRabbit) -> None:
        """Make this (running) node a member of `other`'s cluster."""
        self.ctl("stop_app")
        self.ctl("join_cluster", other.name)
        self.start()

    def to_dict(self) -> dict[str, str | int]:
        return {"root": str(self.root), "port": self.port, "dist_port": self.dist_port,
                "name": self.name}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, str | int]) -> PrivateRabbit:
        return cls(Path(str(data["root"])), int(data["port"]), int(data["dist_port"]),
                   str(data["name"]))  # fmt: skip

    def kill(self) -> None:
        pid = int((self.root / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        while self._node_up():
            time.sleep(0.2)

    def close(self) -> None:
        if self._node_up():
            self.ctl("stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateCluster:
    """A RabbitMQ cluster of one test: `size` private nodes joined to the first one.

    Its state (node names, ports, directories) is kept in `root/cluster.json`, so the
    `scripts/rabbit_cluster.py` rig can start a cluster in one process and stop it in another.
    """

    root: Path
    nodes: list[PrivateRabbit] = field(default_factory=list)

    STATE = "cluster.json"

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what `--broker` and `broker_url` take."""
        return ",".join(self.urls)

    def init(self, size: int = 3) -> PrivateCluster:
        """Start `size` nodes, join them into one cluster, and wait until it is healthy."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the nodes run as rabbitmq and must reach their directories
        prefix = f"txflow-cluster-{uuid.uuid4().hex[:6]}"
        try:
            for i in range(size):
                node = PrivateRabbit(
                    self.root / f"node{i + 1}", name=_node_name(f"{prefix}-n{i + 1}")
                )
                self.nodes.append(node)
                self._save()  # before starting it: a failed start is still torn down
                node.init()
                if i:
                    node.join(self.nodes[0])
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def running(self) -> list[str]:
        """The names of the cluster's running nodes, as its first reachable node sees them."""
        for node in self.nodes:
            if node._node_up():
                out = node.ctl("cluster_status", "--formatter", "json", check=False)
                if out.strip().startswith("{"):
                    return list(json.loads(out).get("running_nodes", []))
        return []

    def wait_healthy(self, timeout: float = COMMAND_TIMEOUT) -> None:
        """Return once every node runs and sees all the others."""
        deadline = time.monotonic() + timeout
        wanted = {node.name for node in self.nodes}
        while set(self.running()) != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not healthy: running {self.running()}, want {wanted}")
            time.sleep(0.5)

    def node_of(self, name: str) -> PrivateRabbit:
        return next(node for node in self.nodes if node.name == name)

    def leaders(self, vhost: str = "/") -> dict[str, str]:
        """Queue name -> the node leading it (quorum queues), asked of a running node."""
        for node in self.nodes:
            if node._node_up():
                out = node.ctl("list_queues", "-p", vhost, "-q", "--formatter", "json",
                               "name", "leader", check=False)  # fmt: skip
                if out.strip().startswith("["):
                    return {q["name"]: q["leader"] for q in json.loads(out) if q.get("leader")}
        return {}

    def _save(self) -> None:
        state = {"nodes": [node.to_dict() for node in self.nodes]}
        (self.root / self.STATE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, root: Path) -> PrivateCluster:
        state = json.loads((root / cls.STATE).read_text())
        return cls(root, [PrivateRabbit.from_dict(node) for node in state["nodes"]])

    def close(self) -> None:
        """Stop every node (killed if it will not stop) and remove the cluster's directory."""
        for node in self.nodes:
            try:
                node.close()
            except Exception:
                with contextlib.suppress(Exception):
                    node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


RIG = Path(__file__).resolve().parent.parent / "scripts" / "rabbit_cluster.py"


def _rig(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(RIG), *args],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT * 3, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"rabbit_cluster.py {' '.join(args)} failed: {done.stderr}")
    return done.stdout


@contextlib.contextmanager
def rigged_cluster(size: int = 3) -> Iterator[PrivateCluster]:
    """A private cluster started, and torn down even on failure, by scripts/rabbit_cluster.py."""
    root = Path(tempfile.mkdtemp(prefix="txflow-cluster-"))
    try:
        urls = _rig("start", str(root), "--nodes", str(size)).strip()
        cluster = PrivateCluster.load(root)
        assert cluster.url == urls, (cluster.url, urls)
        yield cluster
    finally:
        # A start that failed half-way has torn its nodes down itself.
        if (root / PrivateCluster.STATE).exists():
            _rig("stop", str(root))
        shutil.rmtree(root, ignore_errors=True)

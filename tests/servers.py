"""Servers of a test's own: a PostgreSQL cluster and a RabbitMQ node to stop, kill and restart.

Outage tests must not touch the machine's shared servers (5432, 5672) that other tests and
other runs use, so they start their own here, on free ports and in data directories under
the test's temporary directory, and remove them afterwards. Both run as their service
users (PostgreSQL refuses root), from the Debian packages' binaries.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
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


def _own(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of one test: `start()`, `stop()` (immediate), `close()`."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

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
        return self.start()

    def start(self) -> PrivatePostgres:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
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


@dataclass
class PrivateRabbit:
    """A RabbitMQ node of one test, with its own node name, ports and data directory.

    `stop_app()` closes its listener and every connection, as an outage does; `kill()` is
    `kill -9` of the node; `start()` brings either back.
    """

    root: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"txflow-test-{uuid.uuid4().hex[:8]}@localhost")

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
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
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

    def kill(self) -> None:
        pid = int((self.root / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        while self._node_up():
            time.sleep(0.2)

    def close(self) -> None:
        if self._node_up():
            self.ctl("stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

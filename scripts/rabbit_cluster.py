#!/usr/bin/env python3
"""A RabbitMQ cluster of private nodes on this machine, for tests and for trying failover.

    scripts/rabbit_cluster.py start DIR [--nodes 3]   start, join, wait healthy; print the URLs
    scripts/rabbit_cluster.py status DIR              the running nodes and queue leaders
    scripts/rabbit_cluster.py stop DIR                stop every node, remove DIR

Each node has its own name (unique per run), AMQP and distribution ports and data directory
under DIR, and runs as the rabbitmq user (so all share its Erlang cookie). The machine's own
RabbitMQ (rabbit@localhost on 5672) is never touched. The node logic lives in
tests/servers.py (`PrivateRabbit`, `PrivateCluster`), which the tests use directly.
Run as root (nodes are started with runuser).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import PrivateCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rabbit_cluster.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "status", "stop"])
    parser.add_argument("dir", type=Path, help="the cluster's directory (state and data)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size (start)")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "start":
        if (root / PrivateCluster.STATE).exists():
            parser.error(f"{root} already holds a cluster; stop it first")
        cluster = PrivateCluster(root).init(args.nodes)
        print(cluster.url)
        return 0
    if not (root / PrivateCluster.STATE).exists():
        parser.error(f"no cluster in {root}")
    cluster = PrivateCluster.load(root)
    if args.command == "status":
        status = {"urls": cluster.urls, "running": cluster.running(), "leaders": cluster.leaders()}
        print(json.dumps(status, indent=2))
        return 0
    cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`txflow console APP [APP ...]`: serve the operators' web page (docs/console.md).

    txflow console module:app [module:app ...] [--broker URL] [--database URL]
                   [--host 127.0.0.1] [--port 8080] [--read-only] [--auth-file PATH]

Binds loopback by default; any other address needs authentication configured
(`$TXFLOW_CONSOLE_TOKEN`, `$TXFLOW_CONSOLE_USER` and `$TXFLOW_CONSOLE_PASSWORD`, or a file).
Stops on Ctrl-C or SIGTERM like `txflow run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from txflow.cli._common import EXIT_OK, add_urls, load_app, log, run_async
from txflow.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("console", help="serve the operators' web page for apps")
    p.add_argument("targets", nargs="+", help="module:attribute of each app to show")
    add_urls(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--read-only", action="store_true", help="hide and refuse replay and purge")
    p.add_argument(
        "--auth-file", help="file holding `user:password` or a token (else the environment)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_console)


def _cmd_console(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from txflow.console import (
            ConsoleData,
            ConsoleSettings,
            check_bind,
            create_app,
            load_auth,
        )
    except ImportError as exc:
        raise ConfigurationError(
            f"txflow console needs its extra ({exc.name} is missing): pip install 'txflow[console]'"
        ) from exc

    auth = load_auth(args.auth_file)
    check_bind(args.host, auth)
    data = ConsoleData([load_app(t) for t in args.targets], args.broker, args.database)
    app = create_app(data, ConsoleSettings(read_only=args.read_only, auth=auth))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False
    )
    server = _server_class(uvicorn.Server)(config)
    mode = " (read-only)" if args.read_only else ""
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("txflow console on http://%s:%d/%s", host, args.port, mode)
    print(f"txflow console on http://{host}:{args.port}/{mode}", file=sys.stderr, flush=True)
    run_async(server.serve)
    return EXIT_OK if server.started else 69


def _server_class(base: Any) -> Any:
    """uvicorn's server, stopping on SIGINT or SIGTERM with exit code 0 as `txflow run` does.

    uvicorn re-raises the signal it caught once it has shut down, which would make a clean
    stop look like a crash to a supervisor.
    """

    class Server(base):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            stops = (signal.SIGINT, signal.SIGTERM)
            for sig in stops:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in stops:
                    loop.remove_signal_handler(sig)

    return Server

"""Log lines that name the hop they come from: `txflow run --log-format json`.

The hop sets a context variable around each delivery (app, handler, message id,
correlation id); `JsonFormatter` writes every record as one JSON object per line with those
and the current span's trace and span ids, so a log pipeline can join lines to traces and
to one flow instance. The text format does not read them and stays as it was.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from txflow import _telemetry
from txflow.transport import Message

# (app, handler, message id, correlation id) of the delivery the current task works on.
_Hop = tuple[str, str, str | None, str | None]
_hop: ContextVar[_Hop | None] = ContextVar("txflow_hop", default=None)
# The app of the process (`txflow run` serves one), for lines logged outside any hop.
_process_app: str | None = None


def hop_started(app: str, handler: str, message: Message) -> Token[_Hop | None]:
    """Name the current task's delivery in its log lines until `hop_ended`."""
    return _hop.set((app, handler, message.message_id, message.correlation_id))


def hop_ended(token: Token[_Hop | None]) -> None:
    _hop.reset(token)


def set_process_app(name: str | None) -> None:
    """The app named in lines logged outside any hop (start, stop, the relay)."""
    global _process_app
    _process_app = name


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, process, app, handler,
    message_id, correlation_id, trace_id, span_id (null where unknown), and exception."""

    def format(self, record: logging.LogRecord) -> str:
        hop = _hop.get()
        ids = _telemetry.current_ids()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "app": hop[0] if hop else _process_app,
            "handler": hop[1] if hop else None,
            "message_id": hop[2] if hop else None,
            "correlation_id": hop[3] if hop else None,
            "trace_id": ids[0] if ids else None,
            "span_id": ids[1] if ids else None,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)

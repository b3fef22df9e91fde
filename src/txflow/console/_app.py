"""The console as an ASGI app: Starlette routes, Jinja2 pages, the security layer.

Server-rendered pages with htmx for the parts that refresh by themselves: no build step, no
JavaScript of our own beyond starting Mermaid, and Jinja2 escapes everything it renders, so a
message body is text whatever it holds. The Content-Security-Policy allows scripts from the
console itself only, a second wall should a template ever forget to escape.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from txflow.console._data import ConsoleData, redact
from txflow.console._security import CSRF_COOKIE, REALM, Auth, Csrf

log = logging.getLogger("txflow.console")

HERE = Path(__file__).parent
# Seconds between two refreshes of the overview (htmx polling).
REFRESH_SECONDS = 2
SECURITY_HEADERS = {
    # Mermaid styles its SVG with <style> elements, hence 'unsafe-inline' for styles only.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass
class ConsoleSettings:
    """How the console serves: read-only or not, who may use it."""

    read_only: bool = False
    auth: Auth = field(default_factory=Auth)
    csrf: Csrf = field(default_factory=Csrf)
    refresh_seconds: float = REFRESH_SECONDS


def _parse(value: datetime | str | float) -> datetime | None:
    if isinstance(value, float | int):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _age(value: datetime | str | None) -> str:
    if value is None or value == "":
        return ""
    parsed = _parse(value)
    if parsed is None:
        return str(value)
    seconds = max(0.0, (datetime.now(UTC) - parsed).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _time(value: datetime | str | float | None) -> str:
    if value is None or value == "":
        return ""
    parsed = _parse(value)
    if parsed is None:
        return str(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.autoescape = True  # every template, whatever its name ends in
    templates.env.filters["redact"] = lambda v: redact(str(v)) if v is not None else ""
    templates.env.filters["age"] = _age
    templates.env.filters["time"] = _time
    templates.env.filters["short_type"] = lambda v: (v or "").rsplit(".", 1)[-1]
    return templates


class _Guard(BaseHTTPMiddleware):
    """Authentication, the CSRF session cookie and the security headers of every response."""

    def __init__(self, app: Any, settings: ConsoleSettings) -> None:
        super().__init__(app)
        self.settings = settings

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not self.settings.auth.accepts(request.headers.get("authorization")):
            response: Response = PlainTextResponse(
                "authentication required", 401, {"www-authenticate": f'Basic realm="{REALM}"'}
            )
        else:
            session = request.cookies.get(CSRF_COOKIE)
            fresh = session is None
            if session is None:
                session = Csrf.new_session()
            request.state.session = session
            request.state.csrf_token = self.settings.csrf.token(session)
            response = await call_next(request)
            if fresh:
                response.set_cookie(
                    CSRF_COOKIE, session, httponly=True, samesite="strict", path="/"
                )
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def create_app(data: ConsoleData, settings: ConsoleSettings | None = None) -> Starlette:
    """The console's ASGI app for `data`; it closes `data`'s connections on shutdown."""
    from txflow.console import _routes

    settings = settings or ConsoleSettings()
    templates = make_templates()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await data.aclose()

    async def not_found(request: Request, exc: Exception) -> Response:
        detail = exc.detail if isinstance(exc, HTTPException) else "not found"
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return _routes.page(request, "error.html", {"message": detail}, status)

    async def crashed(request: Request, exc: Exception) -> Response:
        # The traceback goes to the console's log, never to the page.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = "the console hit an unexpected error; its log has the details"
        return _routes.page(request, "error.html", {"message": message}, 500)

    app = Starlette(
        routes=[
            *_routes.routes(),
            _static_mount(),
        ],
        middleware=[Middleware(_Guard, settings=settings)],
        exception_handlers={HTTPException: not_found, Exception: crashed},
        lifespan=lifespan,
    )
    app.state.data = data
    app.state.settings = settings
    app.state.templates = templates
    return app


def _static_mount() -> Any:
    from starlette.routing import Mount

    return Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

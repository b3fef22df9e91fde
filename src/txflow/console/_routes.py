"""The console's pages: overview, dead letters (groups, messages, actions), flows, graph.

Every state-changing action is a GET that shows a confirmation (saying how many messages it
touches) and a POST, carrying the CSRF token, that does it and reports what it did.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from txflow.console._data import FLOW_STATUSES, ConsoleData
from txflow.console._security import CSRF_FIELD, CSRF_HEADER


def routes() -> list[BaseRoute]:
    return [
        Route("/", overview, name="overview"),
        Route("/overview/body", overview_body, name="overview_body"),
        Route("/dead-letters", dead_letter_groups, name="dead_letters"),
        Route("/dead-letters/{queue}", dead_letter_queue, name="dead_letter_queue"),
        Route("/dead-letters/{queue}/message", dead_letter, name="dead_letter"),
        Route("/dead-letters/{queue}/replay", confirm_replay, name="replay"),
        Route("/dead-letters/{queue}/replay", replay, methods=["POST"], name="replay_post"),
        Route("/dead-letters/{queue}/purge", confirm_purge, name="purge"),
        Route("/dead-letters/{queue}/purge", purge, methods=["POST"], name="purge_post"),
        Route("/flows", flows, name="flows"),
        Route("/flows/{flow}/{flow_id}", flow, name="flow"),
        Route("/graph", graph, name="graph"),
    ]


def page(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    """Render `template` with what every page shows: the banner, the mode, the CSRF token."""
    data: ConsoleData = request.app.state.data
    settings = request.app.state.settings
    base = {
        "problems": data.problems,
        "read_only": settings.read_only,
        "csrf_token": getattr(request.state, "csrf_token", ""),
        "csrf_field": CSRF_FIELD,
        "refresh_seconds": settings.refresh_seconds,
        "apps": [app.name for app in data.apps],
        "status": status,
    }
    templates = request.app.state.templates
    response: Response = templates.TemplateResponse(
        request, template, {**base, **context}, status_code=status
    )
    return response


def _data(request: Request) -> ConsoleData:
    data: ConsoleData = request.app.state.data
    return data


def _queue(request: Request) -> str:
    queue = _data(request).dead_letter_queue(request.path_params["queue"])
    if queue is None:
        raise HTTPException(404, f"no dead-letter queue {request.path_params['queue']!r} here")
    return queue


async def _checked_form(request: Request) -> dict[str, str]:
    """The POSTed form, after the CSRF token and the read-only mode are checked."""
    if request.app.state.settings.read_only:
        raise HTTPException(403, "the console is read-only (--read-only); nothing was changed")
    form = await request.form()
    token = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not request.app.state.settings.csrf.valid(
        getattr(request.state, "session", None), token if isinstance(token, str) else None
    ):
        raise HTTPException(
            403, "this form is missing its CSRF token or it expired; reload the page, try again"
        )
    return {k: v for k, v in form.items() if isinstance(v, str)}


# -- overview ------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    # The banner goes inside the region that refreshes, so it leaves when the server is back.
    context = {"overview": await _data(request).overview(), "banner_inside": True}
    return page(request, "overview.html", context)


async def overview_body(request: Request) -> Response:
    context = {"overview": await _data(request).overview(), "banner_inside": True}
    return page(request, "_overview_body.html", context)


# -- dead letters --------------------------------------------------------------------------


async def dead_letter_groups(request: Request) -> Response:
    groups = await _data(request).dead_letter_groups()
    return page(request, "dead_letters.html", {"groups": groups})


async def dead_letter_queue(request: Request) -> Response:
    queue = _queue(request)
    exception_type = request.query_params.get("exception")
    messages = await _data(request).dead_letters(queue, exception_type)
    context = {"queue": queue, "exception_type": exception_type, "messages": messages}
    return page(request, "dead_letter_queue.html", context)


async def dead_letter(request: Request) -> Response:
    queue = _queue(request)
    message_id = request.query_params.get("id", "")
    detail = await _data(request).dead_letter(queue, message_id)
    if detail is None and not _data(request).problems:
        raise HTTPException(404, f"no dead letter {message_id!r} in {queue}")
    return page(request, "dead_letter.html", {"queue": queue, "detail": detail})


async def confirm_replay(request: Request) -> Response:
    queue = _queue(request)
    message_id = request.query_params.get("id")
    exception_type = request.query_params.get("exception")
    if message_id:
        found = await _data(request).dead_letter(queue, message_id)
        count = 0 if found is None else 1
    else:
        count = len(await _data(request).dead_letters(queue, exception_type or "-") or [])
    context = {
        "queue": queue,
        "target": queue.removesuffix(".dlq"),
        "message_id": message_id,
        "exception_type": exception_type,
        "count": count,
    }
    return page(request, "confirm_replay.html", context)


async def replay(request: Request) -> Response:
    queue = _queue(request)
    form = await _checked_form(request)
    message_id = form.get("id") or None
    exception_type = form.get("exception") or None
    replayed = await _data(request).replay(
        queue, message_id=message_id, exception_type=exception_type or "-"
    )
    back = request.url_for("dead_letters").path
    if replayed is None:
        result, status = "nothing was replayed: the broker cannot be reached", 503
    elif message_id and replayed == 0:
        result = (
            f"message {message_id} is no longer in {queue}: it was replayed or purged "
            "already; nothing was sent"
        )
        status = 409
    else:
        result, status = f"replayed {replayed} message(s) to {queue.removesuffix('.dlq')}", 200
    return page(request, "result.html", {"result": result, "back": back}, status)


async def confirm_purge(request: Request) -> Response:
    queue = _queue(request)
    count = len(await _data(request).dead_letters(queue) or [])
    return page(request, "confirm_purge.html", {"queue": queue, "count": count})


async def purge(request: Request) -> Response:
    queue = _queue(request)
    await _checked_form(request)
    purged = await _data(request).purge(queue)
    back = request.url_for("dead_letters").path
    if purged is None:
        result, status = "nothing was purged: the broker cannot be reached", 503
    else:
        result, status = f"purged {purged} message(s) from {queue}", 200
    return page(request, "result.html", {"result": result, "back": back}, status)


# -- flows ---------------------------------------------------------------------------------


async def flows(request: Request) -> Response:
    data = _data(request)
    params = request.query_params
    search = (params.get("id") or "").strip()
    if search:
        found = await data.find_flows(search)
        if len(found) == 1:
            url = request.url_for("flow", flow=found[0].flow, flow_id=found[0].flow_id)
            return RedirectResponse(url.path, 303)
        if not found and not data.problems:
            raise HTTPException(404, f"no flow instance {search!r} in the apps' databases")
    else:
        flow_name = params.get("flow") or None
        status = params.get("status") or None
        if status is not None and status not in FLOW_STATUSES:
            raise HTTPException(404, f"no flow status {status!r}; one of {FLOW_STATUSES}")
        try:
            min_age = float(params["age"]) * 60 if params.get("age") else None
        except ValueError:
            raise HTTPException(404, "age is a number of minutes") from None
        found = await data.flows(flow=flow_name, status=status, min_age=min_age)
    context = {
        "flows": found,
        "flow_names": data.flow_names(),
        "statuses": FLOW_STATUSES,
        "params": dict(params),
        "query": urlencode(dict(params)),
    }
    return page(request, "flows.html", context)


async def flow(request: Request) -> Response:
    name, flow_id = request.path_params["flow"], request.path_params["flow_id"]
    detail = await _data(request).flow(name, flow_id)
    if detail is None and not _data(request).problems:
        raise HTTPException(404, f"no instance {flow_id!r} of flow {name!r}")
    return page(request, "flow.html", {"detail": detail, "flow_name": name, "flow_id": flow_id})


async def graph(request: Request) -> Response:
    return page(request, "graph.html", {"mermaid": _data(request).graph()})

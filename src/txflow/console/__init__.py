"""`txflow console`: the operators' web page (dead letters, flows, outbox lag, the graph).

Started by the CLI (`txflow console module:app ...`, see docs/console.md); nothing here is
public API. It needs the `console` extra (`pip install 'txflow[console]'`): Starlette,
Jinja2, uvicorn and python-multipart, imported only when the console starts. Every use of
txflow's internals goes through `_data.py`.
"""

from txflow.console._app import ConsoleSettings, create_app
from txflow.console._data import ConsoleData
from txflow.console._security import check_bind, load_auth

__all__ = ["ConsoleData", "ConsoleSettings", "check_bind", "create_app", "load_auth"]

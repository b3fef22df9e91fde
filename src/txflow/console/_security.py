"""Who may use the console and how a form proves it came from the console's own page.

- Authentication: a token, or a user and password, from the environment or a file. With
  neither, the console serves loopback only (`check_bind`); with either, every request needs
  it, as HTTP Basic (the browser asks; a token is accepted as the password of any user) or as
  `Authorization: Bearer TOKEN`.
- CSRF: every POST carries a token that is an HMAC, under a secret of this process, of a
  random cookie the page set (`SameSite=Strict`, `HttpOnly`). Another site can make the
  browser send the cookie but cannot read it, so it cannot compute the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from txflow import ConfigurationError

TOKEN_ENV = "TXFLOW_CONSOLE_TOKEN"
USER_ENV = "TXFLOW_CONSOLE_USER"
PASSWORD_ENV = "TXFLOW_CONSOLE_PASSWORD"
AUTH_FILE_ENV = "TXFLOW_CONSOLE_AUTH_FILE"
CSRF_COOKIE = "txflow_console_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
REALM = "txflow console"


@dataclass(frozen=True, slots=True)
class Auth:
    """The credentials requests must carry; both None means no authentication."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.password)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries these credentials."""
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return _same(value.strip(), self.token)
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if self.token and _same(password, self.token):
            return True
        return bool(
            self.password and _same(user, self.user or "") and _same(password, self.password)
        )


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def load_auth(path: str | None = None) -> Auth:
    """Credentials from `path` (or `$TXFLOW_CONSOLE_AUTH_FILE`), else from the environment.

    The file holds one line: `user:password`, or a token (no colon).

    Raises:
        ConfigurationError: the file is missing or empty, or a password has no user.
    """
    file = path or os.environ.get(AUTH_FILE_ENV)
    if file:
        try:
            line = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the console's auth file {file}: {exc}") from exc
        if not line:
            raise ConfigurationError(f"the console's auth file {file} is empty")
        user, sep, password = line.partition(":")
        return Auth(user=user, password=password) if sep else Auth(token=line)
    token = os.environ.get(TOKEN_ENV) or None
    env_user = os.environ.get(USER_ENV) or None
    env_password = os.environ.get(PASSWORD_ENV) or None
    if env_password and not env_user:
        raise ConfigurationError(f"${PASSWORD_ENV} is set but ${USER_ENV} is not")
    return Auth(token=token, user=env_user, password=env_password)


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: Auth) -> None:
    """Refuse to serve beyond loopback without authentication.

    Raises:
        ConfigurationError: `host` is not a loopback address and no credentials are set.
    """
    if not is_loopback(host) and not auth.enabled:
        raise ConfigurationError(
            f"refusing to serve the console on {host} without authentication: set "
            f"${TOKEN_ENV}, or ${USER_ENV} and ${PASSWORD_ENV}, or --auth-file PATH "
            "(or bind 127.0.0.1 and reach it through an SSH tunnel)"
        )


class Csrf:
    """Issues and checks the CSRF tokens of one console process."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(32)

    def token(self, session: str) -> str:
        """The token forms of `session` must carry."""
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def valid(self, session: str | None, token: str | None) -> bool:
        return bool(session and token) and _same(self.token(session or ""), token or "")

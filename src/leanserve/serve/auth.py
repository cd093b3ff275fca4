"""Optional bearer-token auth of the /v1 API.

/health, /ready and /metrics stay open: orchestrators and scrapers probe them without keys,
and they reveal nothing of what clients sent.
"""
from __future__ import annotations

import hmac
import os

from .protocol import APIError

ENV_VAR = "LEANSERVE_API_KEY"


def api_keys(cli_keys: list[str] | None, environ=os.environ) -> tuple[str, ...]:
    """Keys from `--api-key` (repeatable) and from $LEANSERVE_API_KEY (comma-separated)."""
    keys = list(cli_keys or []) + environ.get(ENV_VAR, "").split(",")
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


class APIKeyAuth:
    def __init__(self, keys: tuple[str, ...]):
        self.keys = [k.encode() for k in keys]

    def check(self, authorization: str | None) -> None:
        """Raises a 401 unless auth is off or the `Authorization` header holds a valid key."""
        if not self.keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        given = token.strip().encode()
        # compare against every key, so the time taken does not tell which one nearly matched
        if not sum(hmac.compare_digest(given, k) for k in self.keys):
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

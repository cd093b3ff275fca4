"""Optional bearer-token auth of the /v1 API.

/health, /ready and /metrics stay open: orchestrators and scrapers probe them without keys,
and they reveal nothing of what clients sent.

A key may carry a default service class (`--api-key-class KEY=batch`): its requests that
set no `priority` run in that class. It is a default, not a cap: an explicit `priority`
in the body wins, as the field is an extension only leanserve's own clients send.
"""
from __future__ import annotations

import hmac
import os

from .protocol import APIError

ENV_VAR = "LEANSERVE_API_KEY"
CLASSES_ENV_VAR = "LEANSERVE_API_KEY_CLASSES"
SERVICE_CLASSES = ("realtime", "standard", "batch")  # engine.sequence.PRIORITY_CLASSES


def api_keys(cli_keys: list[str] | None, environ=os.environ) -> tuple[str, ...]:
    """Keys from `--api-key` (repeatable) and from $LEANSERVE_API_KEY (comma-separated)."""
    keys = list(cli_keys or []) + environ.get(ENV_VAR, "").split(",")
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


def api_key_classes(cli_entries: list[str] | None, environ=os.environ) -> dict[str, str]:
    """{key: service class} from `--api-key-class KEY=CLASS` (repeatable) and from
    $LEANSERVE_API_KEY_CLASSES (comma-separated KEY=CLASS). The last `=` splits, so a key
    may contain `=` (base64 padding). Raises ValueError on an entry without a known class."""
    classes = {}
    for entry in list(cli_entries or []) + environ.get(CLASSES_ENV_VAR, "").split(","):
        if not entry.strip():
            continue
        key, _, service_class = entry.strip().rpartition("=")
        if not key.strip() or service_class.strip() not in SERVICE_CLASSES:
            raise ValueError(f"an API key class must be KEY=CLASS with CLASS one of {', '.join(SERVICE_CLASSES)}; "
                             f"got {entry.strip()!r}")
        classes[key.strip()] = service_class.strip()
    return classes


class APIKeyAuth:
    def __init__(self, keys: tuple[str, ...], classes: dict[str, str] | None = None):
        """`keys` and the keys of `classes` are accepted; auth is off when there are none."""
        classes = classes or {}
        names = list(dict.fromkeys([*keys, *classes]))
        self.keys = [k.encode() for k in names]
        self.classes = [classes.get(k) for k in names]

    def check(self, authorization: str | None) -> str | None:
        """Raises a 401 unless auth is off or the `Authorization` header holds a valid key.
        Returns the key's default service class (None: no default, or auth is off)."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        given = token.strip().encode()
        # compare against every key, so the time taken does not tell which one nearly matched
        matches = [hmac.compare_digest(given, k) for k in self.keys]
        if not any(matches):
            raise _unauthorized("Incorrect API key provided.")
        return self.classes[matches.index(True)]


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

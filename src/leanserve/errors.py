"""Exceptions that cross layers. The server maps each to an OpenAI-shaped error and status."""


class LeanserveError(Exception):
    """Base class. `param` names the offending request field, where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LeanserveError, ValueError):
    """The request can never succeed as sent (HTTP 400)."""


class Overloaded(LeanserveError):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class ModelLoadError(LeanserveError):
    """A model folder or file cannot be served: unknown architecture, corrupt or truncated weights."""

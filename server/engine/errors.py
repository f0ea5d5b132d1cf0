"""Exceptions the engine raises for requests it cannot take; the HTTP layer maps them."""


class EngineError(Exception):
    """Base class for request-level engine errors."""


class RequestTooLongError(EngineError, ValueError):
    """Prompt plus max_tokens exceeds the context or what the KV cache can ever hold (HTTP 400)."""


class QueueFullError(EngineError):
    """More requests waiting than --max-queued-requests allows (HTTP 429)."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; no request can be served (HTTP 503/500)."""

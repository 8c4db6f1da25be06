"""An exception as one line, for the places that report it inside a row or
a message (a plan's fallbacks, a failed comparison row, another rank's
error)."""
from __future__ import annotations

__all__ = ["error_line"]


def error_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` with the message's whitespace folded onto one line
    and cut to `limit` characters."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

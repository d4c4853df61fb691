"""The server's request log: one line per request, once its response has ended."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("llm_modules.serving")  # the package's logger: `serve` sets its level and handler


class RequestLog:
    """ASGI middleware: one log line per request once its response has ended (a stream included): method, path,
    status, prompt and completion tokens (what the handler put in `request.state`; `-` when none) and seconds.
    A client gone before the end is logged with status 499, as nginx does.

    Plain ASGI because an `@app.middleware("http")` function returns when a stream starts, before its tokens are
    known, and sees neither the disconnect nor the end of the body.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, ended, gone = time.monotonic(), 500, False, False
        state = scope.setdefault("state", {})  # what `request.state` reads and writes

        async def receiving() -> dict:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not ended)
            return message

        async def sending(message: dict) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        finally:
            log.info(
                "%s %s %d prompt_tokens=%s completion_tokens=%s %.2fs", scope["method"], scope["path"],
                499 if gone else status, state.get("prompt_tokens", "-"), state.get("completion_tokens", "-"),
                time.monotonic() - started,
            )

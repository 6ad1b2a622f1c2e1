"""The request body limit: bodies over --max_body_bytes are refused with 413 before any route
reads them, by Content-Length or by counting a chunked body, and drained first so the client
sees the answer.
"""

import asyncio

from serve.http_types import error


# What a refused body may still cost us: read and thrown away, so that the client sees the 413 (below).
DRAIN_MAX_BYTES = 64 * 1024 * 1024  # 32 bodies of the default limit; beyond it, answer at once
DRAIN_MAX_SECONDS = 5.0  # nginx's lingering_timeout; a client this slow sees the connection close


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 (by Content-Length, or by counting a chunked body)."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= DRAIN_MAX_BYTES:
                await discard_body(receive, DRAIN_MAX_BYTES, DRAIN_MAX_SECONDS)
            return await self.too_large(scope, receive, send)
        # Read the body here (FastAPI would buffer it anyway), counting, then replay it downstream.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await discard_body(receive, DRAIN_MAX_BYTES - size, DRAIN_MAX_SECONDS)
                return await self.too_large(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # waits for http.disconnect, as Starlette expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        message = f"request body is larger than the limit of {self.max_bytes} bytes; send fewer or shorter texts."
        await error(413, message, headers={"connection": "close"})(scope, receive, send)


async def discard_body(receive, max_bytes, max_seconds):
    """Read the rest of a refused body and drop it: at most `max_bytes`, for at most `max_seconds`.

    Why: urllib and requests send the whole body before they read the answer. Closing the socket
    with their bytes unread makes the kernel send a reset, and they see "connection reset by peer"
    instead of our 413. (curl sends `Expect: 100-continue` and waits: it is answered at once, unread.)
    """
    try:
        async with asyncio.timeout(max_seconds):
            while max_bytes >= 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return  # the client went away, or the body is read to its end
                max_bytes -= len(message.get("body", b""))
    except TimeoutError:
        pass

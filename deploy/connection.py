"""HTTP/1.1 connection limits that uvicorn does not set: a deadline for a request's headers and a cap on their size.

uvicorn (0.55, httptools) times out idle keep-alive connections (`timeout_keep_alive`) but never a connection that
is still sending its headers: a client that opens connections and sends a header line every few seconds
(slowloris) holds them as long as it likes, and httptools accepts headers of any size (llhttp has no limit; h11's
`h11_max_incomplete_event_size` applies to h11 only). `limited(...)` returns uvicorn's httptools protocol with both:

- a request's headers must be complete within `header_timeout_s` of its first byte (or of the connection being
  opened): else 408 and the connection is closed;
- at most `max_header_bytes` of request line and headers: else 431 and the connection is closed. Bytes are counted
  as they arrive too (before httptools buffers a header), so a huge header never accumulates in memory.

Both answers are the server's one-line JSON error and a warning in the log (no traceback).
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("deploy.server")
REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class HeadersTooLarge(Exception):
    """Raised in the parser's callback: httptools stops, uvicorn answers through `send_400_response` (431 here)."""


class LimitedHttpTools(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 << 10

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer, self._begun = None, False
        self._start_headers()

    def connection_lost(self, exc) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._start_headers()

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._stop_header_timer()
        if self._header_size > self.max_header_bytes:  # the whole request arrived at once: refuse it here
            raise HeadersTooLarge()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._header_size > self.max_header_bytes:  # HeadersTooLarge stopped the parser
            self._refuse(431, f"the request's headers are over {self.max_header_bytes} bytes")
        else:
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        counting = self._awaiting_headers
        if counting:
            self._header_bytes += len(data)
        super().data_received(data)
        if counting and self._awaiting_headers and self._header_bytes > self.max_header_bytes:
            self._refuse(431, f"the request's headers are over {self.max_header_bytes} bytes")

    # ---- the limits ------------------------------------------------------------------------------

    def _start_headers(self) -> None:
        self._awaiting_headers, self._header_bytes, self._header_size = True, 0, 0
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and self._begun:
            self._refuse(408, f"the request's headers did not arrive within {self.header_timeout_s:g} s")
        elif self._awaiting_headers and not self.transport.is_closing():  # connected, sent nothing: just close
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._awaiting_headers = False
        self._stop_header_timer()
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning("refused a connection from %s: %s", client, message,
                    extra={"event": "connection", "status": status, "client": client})
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, REASONS[status], len(body), body))
        self.transport.close()


def limited(header_timeout_s: float, max_header_bytes: int) -> type[LimitedHttpTools]:
    """uvicorn's httptools protocol with these limits (pass it as `uvicorn.Config(http=...)`)."""
    return type("LimitedHttpTools", (LimitedHttpTools,), {"header_timeout_s": header_timeout_s,
                                                          "max_header_bytes": max_header_bytes})

"""Forwarding Label Studio's calls to a backend: status, headers and body pass through, streamed.

Only the transport is ours: a backend that cannot be reached is a 502 naming it, one that does
not answer within PROXY_TIMEOUT_S (longer than Label Studio's 100 s, so the backend's own 504
comes first) is a 504. Whatever the backend answers, errors included, goes back unchanged. A
backend that moved (renewed on another port) while the request was on its way is asked again there.
"""

from __future__ import annotations

from collections.abc import Callable

import requests
from flask import Request, Response

from backend.core.errors import DeadlineExceeded, UpstreamUnavailable

from .registry import BackendRecord

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# What the backend answered that does not go back: hop-by-hop (but its length, which the stream keeps), and
# what the orchestrator's own server sets (two Date headers are not HTTP, and Server names what answered).
NOT_PASSED_BACK = (HOP_BY_HOP - {"content-length"}) | {"date", "server"}
CHUNK = 1 << 16


def backend_session() -> requests.Session:
    """A pooled HTTP session to the orchestrator's own backends, which no proxy stands in front of: the
    environment's HTTP_PROXY (where NO_PROXY does not name them) would otherwise take even loopback calls,
    and reading the environment and ~/.netrc again for every request costs a fifth of its CPU."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=64))
    return session


class Proxy:
    """One pooled HTTP session to every backend."""

    def __init__(self, timeout_s: float, locate: Callable[[str], BackendRecord | None] = lambda _: None) -> None:
        self.timeout_s = timeout_s
        self.locate = locate  # a backend's record as it stands now (the registry's)
        self.session = backend_session()

    def forward(self, record: BackendRecord, path: str, request: Request, authorization: str | None = None,
                timeout_s: float | None = None) -> Response:
        """``authorization``: what the backend is sent instead of the client's own (its configure token);
        ``timeout_s``: how long its answer may take, PROXY_TIMEOUT_S by default."""
        timeout_s = timeout_s or self.timeout_s
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if authorization is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = authorization
        # The request body is read whole (a /predict body is JSON the backend parses whole anyway), and kept:
        # a request whose backend was put to sleep on its way is sent again once it has woken (api.send).
        # The answer is streamed back as it arrives.
        body = request.get_data(cache=True) or None
        for attempt in range(3):
            try:
                upstream = self._send(record, path, request, headers, body, timeout_s)
                break
            except requests.ConnectionError as exc:
                moved = self.locate(record.id)
                if moved is None or moved.url == record.url or attempt == 2:
                    raise UpstreamUnavailable(
                        f"backend {record.id} is not answering ({record.state})",
                        "It may be restarting: GET /backends/<id> shows its state, restarts and log.",
                    ) from exc
                record = moved  # renewed on another port since: asked there (it moves once a renewal)
        response = Response(
            upstream.raw.stream(CHUNK, decode_content=False),
            status=upstream.status_code,
            headers=[(k, v) for k, v in upstream.headers.items() if k.lower() not in NOT_PASSED_BACK],
        )
        response.call_on_close(upstream.close)
        return response

    def _send(self, record: BackendRecord, path: str, request: Request, headers: dict[str, str], body: bytes | None,
              timeout_s: float) -> requests.Response:
        url = f"{record.url}/{path.lstrip('/')}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        try:
            return self.session.request(request.method, url, headers=headers, data=body, stream=True,
                                        timeout=(min(2.0, timeout_s), timeout_s), allow_redirects=False)
        except requests.Timeout as exc:
            raise DeadlineExceeded(
                f"backend {record.id} did not answer within {timeout_s:g} s",
                "GET /backends/<id> shows its state and log.",
            ) from exc

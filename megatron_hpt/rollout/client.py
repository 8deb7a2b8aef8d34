"""Async HTTP client of one SGLang-protocol server (ours or real SGLang).

Failures are sorted by what the caller should do: ``ServerUnavailable`` (connection
refused or reset, timeout, 5xx: retry elsewhere) and ``RequestRefused`` (4xx: the
request itself is wrong, retrying cannot help). With an API key every request carries
``Authorization: Bearer <key>`` (SGLang's ``--api-key`` scheme).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import aiohttp

from megatron_hpt.rollout import protocol

RequestObserver = Callable[[str, str, Any], None]
"""Called as observer(url, path, body) before each request is sent (tracing, tests)."""


class ServerUnavailable(RuntimeError):
    """The server did not answer properly (down, reset, timeout, 5xx); worth a retry elsewhere."""


class RequestRefused(RuntimeError):
    """The server answered 4xx: the request is wrong. ``status`` and ``body`` say why."""

    def __init__(self, url: str, path: str, status: int, body: Any):
        hint = " (the server wants another API key: check rollout.api_key)" if status in (401, 403) else ""
        super().__init__(f"{url}{path} refused the request ({status}){hint}: {protocol.error_message(body)}")
        self.status, self.body = status, body


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The request headers that authenticate with ``api_key`` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SGLangClient:
    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        observer: RequestObserver | None = None,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.session = session
        self.timeout_s = timeout_s
        self.observer = observer
        self.headers = auth_headers(api_key)

    async def request(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        """JSON (or text) of a 2xx answer; raises ServerUnavailable or RequestRefused."""
        if self.observer is not None:
            self.observer(self.url, path, body)
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self.session.request(method, self.url + path, json=body, timeout=timeout, headers=self.headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise ServerUnavailable(f"{self.url}{path}: {type(e).__name__}: {e}") from e
        payload = _decode(raw)
        if status >= 500:
            raise ServerUnavailable(f"{self.url}{path} answered {status}: {protocol.error_message(payload)}")
        if status >= 400:
            raise RequestRefused(self.url, path, status, payload)
        return payload

    async def post(self, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        return await self.request("POST", path, body if body is not None else {}, timeout_s)

    async def get(self, path: str, timeout_s: float | None = None) -> Any:
        return await self.request("GET", path, None, timeout_s)

    async def status(self, path: str, timeout_s: float = 30.0) -> int | None:
        """Status code of GET path, None when nothing answers."""
        try:
            async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=timeout_s), headers=self.headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
            return None


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode(errors="replace")

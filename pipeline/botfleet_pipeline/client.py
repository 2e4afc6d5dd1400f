"""A small HTTP client for botfleet-server's API, standard library only.

It runs where only Python is installed (an Airflow worker, a laptop): no torch, onnx,
numpy or requests. Answers are JSON; an error answer becomes an :class:`ApiError` with the
server's own message (``{"error": "..."}``). A bearer token, when the server has
``[auth]`` tokens, comes from the caller or from ``BOTFLEET_TOKEN``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "BOTFLEET_TOKEN"
CHUNK = 1024 * 1024


class ShipError(Exception):
    """Shipping a model failed; the message says why."""


class ApiError(ShipError):
    """The server answered with an error status (or could not be reached: ``status`` 0)."""

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        super().__init__(
            f"{method} {url}: HTTP {status}: {message}" if status else f"{method} {url}: {message}"
        )
        self.method = method
        self.url = url
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth asking again: no answer, or the server's own trouble."""
        return self.status == 0 or self.status >= 500


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body: inline bytes or a file streamed from disk."""

    name: str
    content_type: str
    data: bytes | None = None
    path: Path | None = None
    filename: str | None = None

    def header(self, boundary: str) -> bytes:
        disposition = f'form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        return (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {self.content_type}\r\n\r\n"
        ).encode()

    def size(self) -> int:
        return len(self.data) if self.data is not None else Path(self.path).stat().st_size

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


class Multipart:
    """A multipart/form-data body of known length, read from disk as it is sent."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.boundary = f"botfleet-{uuid.uuid4().hex}"

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _trailer(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        return sum(len(p.header(self.boundary)) + p.size() + 2 for p in self.parts) + len(self._trailer())

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            yield part.header(self.boundary)
            yield from part.chunks()
            yield b"\r\n"
        yield self._trailer()


@dataclass(frozen=True)
class Server:
    """botfleet-server's base URL (``http://host:8080``) and the token to send, if any."""

    url: str
    token: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def at(cls, url: str, token: str | None = None, timeout_s: float = 60.0) -> Server:
        """The server at ``url``; the token is ``token``, else ``BOTFLEET_TOKEN``, else none."""
        return cls(url.rstrip("/"), token or os.environ.get(TOKEN_ENV) or None, timeout_s)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        multipart: Multipart | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Sends one request; returns the status and the decoded JSON answer (None if empty)."""
        url = f"{self.url}{path}"
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        data: Any = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        elif multipart is not None:
            data = iter(multipart)
            all_headers["Content-Type"] = multipart.content_type
            all_headers["Content-Length"] = str(len(multipart))
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as err:
            body = _decode(err.read())
            message = body.get("error") if isinstance(body, dict) and "error" in body else body
            raise ApiError(method, url, err.code, str(message) if message else err.reason) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApiError(method, url, 0, f"no answer: {reason}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)[1]


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")

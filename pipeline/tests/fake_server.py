"""A stand-in for botfleet-server's API on loopback: records every request and answers
from a script, so the ship step's HTTP is tested without the real server."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def parts(self) -> dict[str, bytes]:
        """The multipart/form-data parts by name."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        return {
            part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()
        }


@dataclass
class FakeServer:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    # GET /api/v1/rollouts/{id} answers these in turn (the last one stays): a dict is the
    # rollout view, an int an error status.
    views: list = field(default_factory=list)
    rollout_sha256: str | None = None
    record_sha256: str | None = None

    def answer(self, seen: Seen) -> tuple[int, object]:
        self.seen.append(seen)
        if seen.method == "POST" and seen.path == "/api/v1/models":
            model = seen.parts()["model"]
            sha256 = self.record_sha256 or hashlib.sha256(model).hexdigest()
            meta = json.loads(seen.parts()["metadata"])
            return 201, {"slot": meta["slot"], "version": meta["version"], "release": 1, "sha256": sha256}
        if seen.method == "POST" and seen.path == "/api/v1/rollouts":
            # As the server: a `sha256` other than the version's is refused, nothing made.
            wanted = seen.json().get("sha256")
            if wanted is not None and self.rollout_sha256 is not None and wanted != self.rollout_sha256:
                message = f"registered with SHA-256 {self.rollout_sha256}, not the requested {wanted}"
                return 409, {"error": message}
            return 202, {"rollout_id": "r-1", "devices": ["robot-1"]}
        if seen.method == "GET" and seen.path == "/api/v1/rollouts/r-1":
            gets = sum(1 for s in self.seen if s.method == "GET")
            if not self.views:
                return 200, self.view("in_progress")
            view = self.views[min(gets, len(self.views)) - 1]
            return (view, {"error": "try later"}) if isinstance(view, int) else (200, view)
        return 404, {"error": f"no route {seen.method} {seen.path}"}

    def view(self, state: str, devices: dict | None = None, reason: str | None = None) -> dict:
        devices = devices or {"robot-1": {"outcome": "in_progress", "history": [], "wave": 0}}
        summary: dict[str, int] = {}
        for d in devices.values():
            summary[d["outcome"]] = summary.get(d["outcome"], 0) + 1
        view = {
            "rollout_id": "r-1",
            "slot": "digits",
            "version": "1.0.0",
            "release": 1,
            "sha256": self.rollout_sha256,
            "state": state,
            "wave": 0,
            "waves": 1,
            "summary": summary,
            "devices": devices,
        }
        if reason:
            view["reason"] = reason
        return view


def start() -> tuple[FakeServer, ThreadingHTTPServer]:
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
            status, body = fake.answer(seen)
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    return fake, httpd

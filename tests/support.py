"""Helpers shared by several test modules (importable because pytest's pythonpath has tests/)."""

from __future__ import annotations

import random


def words(rng: random.Random, n: int) -> str:
    """``n`` random lower-case pseudo-words: text no two calls share by chance."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                    for _ in range(n))


def edit(rng: random.Random, text: str, changes: int) -> str:
    """``text`` with ``changes`` of its words replaced: a near-duplicate of a chosen closeness."""
    tokens = text.split()
    for _ in range(changes):
        tokens[rng.randrange(len(tokens))] = words(rng, 1)
    return " ".join(tokens)


class LocalJSONServer:
    """A JSON-over-HTTP server on 127.0.0.1 (a free port) in a background thread.

    Subclasses answer each POST in :meth:`respond`; every request is recorded in ``requests``
    as ``{"path", "headers" (lower-cased names), "body"}`` so tests can check it server-side.
    """

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {name.lower(): value for name, value in self.headers.items()}
                owner.requests.append({"path": self.path, "headers": headers, "body": body})
                status, payload = owner.respond(self.path, headers, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    # The openai client honours server-directed delays; keep retrying tests fast.
                    self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def respond(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict]:
        raise TypeError(f"{type(self).__name__} must define respond()")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Helpers shared by several test modules (importable because pytest's pythonpath has tests/)."""

from __future__ import annotations

import json
import random
from pathlib import Path


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


class ScriptedTeacher(LocalJSONServer):
    """An OpenAI-compatible teacher that answers each chat prompt with the first ``n`` of
    ``script[prompt]`` (cycled), fails with HTTP 500 for prompts in ``fail``, and reports
    ``usage`` = (prompt tokens, completion tokens per sample)."""

    def __init__(self, script: dict[str, list[str]], *, fail: set[str] = frozenset(), usage: tuple[int, int] = (10, 5)):
        self.script = script
        self.fail = fail
        self.usage = usage
        super().__init__()

    def respond(self, path, headers, body):
        prompt = body["messages"][-1]["content"]
        if prompt in self.fail:
            return 500, {"error": {"message": "teacher is down", "type": "server_error"}}
        n = body.get("n", 1)
        texts = (self.script[prompt] * n)[:n]
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                   for i, text in enumerate(texts)]
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                     "usage": {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1] * n,
                               "total_tokens": self.usage[0] + self.usage[1] * n}}


def write_problems(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

"""Running the API with uvicorn: in the foreground (``aqlmkit serve``) or in a thread (tests, benchmarks)."""
from __future__ import annotations

import socket
import threading
import time

from aqlmkit.errors import AqlmkitError
from aqlmkit.runtime.api import ServerConfig, build_app
from aqlmkit.runtime.engine import Engine


def _uvicorn_server(engine: Engine, tokenizer, cfg: ServerConfig, host: str, port: int):
    import uvicorn

    app = build_app(engine, tokenizer, cfg)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(engine: Engine, tokenizer, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted; the engine thread runs for the server's lifetime."""
    server = _uvicorn_server(engine, tokenizer, cfg, host, port)
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The server in a thread on a free loopback port: ``with BackgroundServer(...) as url:``."""

    def __init__(self, engine: Engine, tokenizer, cfg: ServerConfig, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        self.engine, self.host, self.port = engine, host, port or free_port(host)
        self.server = _uvicorn_server(engine, tokenizer, cfg, self.host, self.port)
        self.thread = threading.Thread(target=self.server.run, name="aqlmkit-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.engine.stop()
                raise AqlmkitError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.stop()

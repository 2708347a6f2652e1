"""`fastdecode serve`: an OpenAI-compatible HTTP server with continuous batching (see app.py, ../batch.py)."""
from __future__ import annotations

import argparse

from fastdecode.server.app import create_app

__all__ = ["create_app", "serve"]


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted (the `fastdecode serve` command).

    The engine runs on this (the main) thread, the one that loaded the model, and uvicorn on a
    second one: forwards on another thread than the loading one ran 2-3x slower (see
    BatchEngine.run)."""
    import signal
    import threading

    import uvicorn

    from fastdecode.cli import _llm

    llm = _llm(args)
    app = create_app(llm, model_name=args.served_model_name, method=args.method, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, api_key=args.api_key, engine_thread=False,
                     prefill_chunk=args.prefill_chunk)
    llm.new_drafter(args.method)  # what the default method builds on first use (recycling's table) is built now
    engine = app.state.engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))

    def http() -> None:
        try:
            server.run()  # off the main thread uvicorn installs no signal handlers: Ctrl-C reaches us
        finally:
            engine.stop()  # the server ended (or failed to start, e.g. the port is taken)

    def shut_down(signum: int, frame: object) -> None:  # uvicorn's own handlers need the main thread
        server.should_exit = True  # the server ends, then http() stops the engine and run() returns

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shut_down)
    web = threading.Thread(target=http, name="fastdecode-http", daemon=True)
    web.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        web.join(timeout=10)
    return 0 if server.started else 1

"""`fastdecode serve`: an OpenAI-compatible HTTP server with continuous batching (see app.py, ../batch.py)."""
from __future__ import annotations

import argparse

from fastdecode.server.app import create_app

__all__ = ["create_app", "serve"]


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted (the `fastdecode serve` command)."""
    import uvicorn

    from fastdecode import LLM

    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, max_model_len=args.max_model_len)
    app = create_app(llm, model_name=args.served_model_name, method=args.method, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

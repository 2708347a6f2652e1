"""`python -m fastdecode.bench ...`: the bench without the `fastdecode` CLI."""
from __future__ import annotations

import sys

from fastdecode.bench import build_parser, run_bench

if __name__ == "__main__":
    sys.exit(run_bench(build_parser().parse_args()))

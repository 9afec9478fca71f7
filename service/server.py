"""``cicw-stream serve``: the REST control plane in the foreground (uvicorn).

Without ``--ray-address`` it starts a local Ray head as a process of its own (once; a restarted
service finds and reuses it), so jobs keep training while the API process restarts."""

from __future__ import annotations

import argparse
import logging
import sys

# Only the standard library at import: `cicw-stream --help` must stay fast.
from .core.defaults import DEFAULT_PORT


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the REST control plane (jobs run on Ray and outlive it)")
    serve.add_argument("--ray-address", help="an existing Ray cluster's GCS host:port (default: an embedded local "
                                             "head, started once and reused across restarts)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--db", dest="db_url", help="job store URL (default: SQLite in the data dir; "
                                                   "postgresql://... for several replicas)")
    serve.add_argument("--data-dir", help="service state: store, admin token, keys (default ./.cicw-service)")
    serve.add_argument("--ray-num-cpus", type=int, help="CPUs of the embedded Ray head (default: all)")
    serve.add_argument("--access-log", action="store_true",
                       help="log every request (off by default: cicw_http_requests_total counts them)")
    serve.set_defaults(run=run_serve)


def _show_token(token: str) -> None:
    # Printed once, at the first start; afterwards it is only in data_dir/admin-token (mode 0600).
    print(f"cicw-stream serve: generated an admin token (shown once; also in the data dir's admin-token):\n"
          f"  {token}", file=sys.stderr, flush=True)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .core.config import Settings
    from .core.security import TokenConfigError, load_tokens

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(ray_address=args.ray_address, host=args.host, port=args.port,
                                     db_url=args.db_url, data_dir=args.data_dir, ray_num_cpus=args.ray_num_cpus)
    except ValidationError as exc:
        print(f"cicw-stream serve: {exc}", file=sys.stderr)
        return 2
    try:  # before anything starts: bad tokens refuse the start, naming the problem
        tokens, generated = load_tokens(settings.api_tokens.get_secret_value() if settings.api_tokens else None,
                                        settings.tokens_file, settings.data_dir)
    except TokenConfigError as exc:
        print(f"cicw-stream serve: {exc}", file=sys.stderr)
        return 2
    if generated is not None:
        _show_token(generated)
    uvicorn.run(create_app(settings, tokens=tokens), host=settings.host, port=settings.port, log_level="info",
                access_log=args.access_log, timeout_graceful_shutdown=10)
    return 0

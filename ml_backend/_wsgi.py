"""Entry points of the backend's web app.

* gunicorn (production): ``gunicorn --bind 127.0.0.1:9090 --workers 2 --threads 4 'ml_backend._wsgi:app'``
  (``app`` is built on first access, reading the environment then, not at import).
* ``python ml_backend/_wsgi.py [--host 127.0.0.1] [--port 9090]`` - what
  ``label-studio-ml start ml_backend`` runs; serves with Flask's threaded server, never in
  debug mode.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

_app = None


def __getattr__(name):       # PEP 562: `app` is created lazily, when gunicorn asks for it
    global _app
    if name == "app":
        if _app is None:
            from ml_backend.app import create_app

            _app = create_app()
        return _app
    raise AttributeError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Active label refinement ML backend for Label Studio")
    parser.add_argument("--host", default=os.environ.get("ALR_HOST", "127.0.0.1"),
                        help="bind address (default 127.0.0.1: keep the backend on loopback or a private network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ALR_PORT", "9090")))
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    # label-studio-ml start passes more options (--model-dir, --kwargs, --debug, ...): ignored
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # werkzeug sets its own logger to INFO when it is unset, which logged every request whatever
    # --log-level said
    logging.getLogger("werkzeug").setLevel(args.log_level.upper())
    if unknown:
        logging.getLogger(__name__).info("ignoring options %s", unknown)
    from ml_backend.app import create_app

    application = create_app()
    application.run(host=args.host, port=args.port, debug=False, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    # Run as a script, Python puts ml_backend/ itself first on sys.path, where model.py would
    # shadow the engine package `model`: put the repository root there instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))
    sys.exit(main())

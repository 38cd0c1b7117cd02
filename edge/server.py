"""Runs the edge: `python -m edge`. Client disconnects cancel their handlers (and so generation)."""

from __future__ import annotations

import logging

from aiohttp import web

from cloudach.loop import choose_loop
from cloudach.telemetry import configure_tracing
from edge.app import create_app
from edge.config import EdgeConfig


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    configure_tracing("edge")
    logging.getLogger("edge").info("edge on the %s event loop", choose_loop())
    config = EdgeConfig.from_env()
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        reuse_port=config.reuse_port or None,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_s,
        print=lambda msg: logging.getLogger("edge").info("edge listening on http://%s:%d", config.host, config.port),
    )

"""
A real PayFlux node for tests: built by ``build_node`` from real settings, listening on free
loopback ports, talking to a real redis-server; requests go over real sockets with treq.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from payflux.config import load_settings
from payflux.node import build_node

API_SECRET = "test-secret-0123456789abcdef"
API_KEYS = f"producer-a:{API_SECRET},producer-b:other-secret-0123456789"


class RunningNode:
    def __init__(self, node, ingest_port: int, side_port: int | None):
        self.node = node
        self.app = node.app
        self.metrics = node.metrics
        self.base = f"http://127.0.0.1:{ingest_port}"
        self.side = f"http://127.0.0.1:{side_port}" if side_port else None
        self.ingest_port = ingest_port

    def post(self, path: str, body: bytes | str | Any, content_type: str = "application/json",
             secret: str | None = API_SECRET, headers: dict | None = None):
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        h = {"Content-Type": [content_type]}
        if secret is not None:
            h["Authorization"] = [f"Bearer {secret}"]
        for k, v in (headers or {}).items():
            h[k] = [v]
        return treq.post(self.base + path, data=body, headers=h, persistent=False)

    def get(self, path: str, side: bool = False):
        return treq.get((self.side if side else self.base) + path, persistent=False)


def _port_of(listener) -> Deferred:
    """The listening port, without consuming the service's own Deferred (stopService needs it)."""
    d = Deferred()

    def got(port):
        d.callback(port)
        return port

    listener._waitingForPort.addCallback(got)
    return d


@inlineCallbacks
def start_node(testcase, redis_url: str | None, config_text: str | None = None, **options: Any):
    """
    Start a node with ``options`` (underscored names) and optionally a TOML config file body
    (for ``[[consumers]]`` tables) on free ports; stopped at cleanup.
    """
    cli = {
        "listen": "tcp:0:interface=127.0.0.1",
        "metrics_listen": "tcp:0:interface=127.0.0.1",
        "redis_url": redis_url,
        "api_keys": API_KEYS,
        "redis_timeout": "1.0",
        "stats_interval": "0.2",
    }
    cli.update({k: (str(v) if not isinstance(v, bool) else v) for k, v in options.items()})
    config_path = None
    if config_text is not None:
        fd, config_path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        testcase.addCleanup(os.unlink, config_path)
    settings = load_settings(cli, env={}, config_path=config_path)
    node = build_node(settings, reactor)
    node.startService()
    testcase.addCleanup(lambda: node.stopService() if node.running else None)
    port = yield _port_of(node.ingest_listener)
    side_port = None
    if node.side_listener is not None:
        side_port = (yield _port_of(node.side_listener)).getHost().port
    return RunningNode(node, port.getHost().port, side_port)


@inlineCallbacks
def read_json(response):
    body = yield response.content()
    return json.loads(body)

"""
The side listener (``--metrics-listen``): /metrics, /health and /ready only, for Prometheus and
load balancers, so they never compete with producers on the ingest port.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.server import Site

from payflux.ingest.app import IngestApp


class SideApp:
    app = Klein()

    def __init__(self, ingest: IngestApp):
        self.ingest = ingest

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        return self.ingest.metrics_route(request)

    @app.route("/health", methods=["GET"])
    def health(self, request):
        return self.ingest.health(request)

    @app.route("/ready", methods=["GET"])
    def ready(self, request):
        return self.ingest.ready(request)

    def site(self) -> Site:
        site = Site(self.app.resource())
        site.log = lambda request: None
        return site

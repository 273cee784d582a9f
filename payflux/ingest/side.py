"""
The side listener (``--metrics-listen``): /metrics, /health and /ready only, for Prometheus and
load balancers, so they never compete with producers on the ingest port; plus the operator's
status page, /status and /status.json (:mod:`payflux.observability.status`), and the alerts API
for operators, ``/v1/alerts...`` (:mod:`payflux.ingest.alerts`, admin keys only).
"""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import ensureDeferred
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from payflux.ingest.alerts import AlertsApi
from payflux.ingest.app import IngestApp, json_response, not_ready
from payflux.ingest.errors import ApiError
from payflux.ingest.http import OUTCOME_BODY_LIMIT, SMALL_BODY_LIMIT, IngestSite
from payflux.observability.status import node_status, supervisor_status


def _not_found(request) -> bytes:
    return json_response(request, 404, {"error": "not_found", "message": "no such endpoint"})


def _method_not_allowed(request, failure) -> bytes:
    allowed = ", ".join(failure.value.valid_methods or [])
    request.setHeader(b"Allow", allowed.encode("ascii"))
    return json_response(request, 405, {"error": "method_not_allowed", "message": f"allowed methods: {allowed}"})


def _alerts_route(alerts: AlertsApi | None, request, endpoint: str):
    if alerts is None:  # a side listener built without a store (tests): the API isn't here
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json")
        return ApiError(404, "not_found", "the alerts API is not served here").body()
    return getattr(alerts, endpoint)(request)


def side_site(resource, header_timeout: float | None) -> IngestSite:
    """
    A side listener's Site: the ingest listener's HTTP layer (payflux/ingest/http.py), so a bad
    head is a JSON 400, a slow one 408, an oversize one 414/431, and a body over its cap (an
    outcome's 16 KiB, 8 KiB elsewhere) a 413 while it is read; no preflight (the alerts API
    checks its admin key itself).
    """
    def body_limit(path: bytes) -> int:
        return OUTCOME_BODY_LIMIT if path.startswith(b"/v1/alerts/") else SMALL_BODY_LIMIT

    return IngestSite(resource, body_limit, lambda request: None, header_timeout=header_timeout)


#: The alerts API's routes, the same on both side listeners: (rule, method, the AlertsApi method).
ALERT_ROUTES = (
    ("/v1/alerts", "GET", "list"),
    ("/v1/alerts/<path:alert_path>", "GET", "get"),
    ("/v1/alerts/<path:alert_path>", "POST", "post"),
    ("/v1/risk/processors", "GET", "processors"),
    ("/v1/risk/retry-advice", "GET", "retry_advice"),
)


def _operator_routes(app: Klein) -> None:
    """On ``app`` (a side listener's, in its class body): JSON 404/405 answers and the alerts API's
    routes, answered by the instance's ``alerts``."""
    app.handle_errors(NotFound)(lambda self, request, failure: _not_found(request))
    app.handle_errors(MethodNotAllowed)(lambda self, request, failure: _method_not_allowed(request, failure))
    for rule, method, endpoint in ALERT_ROUTES:
        def route(self, request, _endpoint=endpoint, **_path):
            return _alerts_route(self.alerts, request, _endpoint)

        app.route(rule, methods=[method], endpoint=f"alerts_{endpoint}")(route)


class SideApp:
    app = Klein()

    def __init__(self, ingest: IngestApp, alerts_stream: str | None = None, alerts: AlertsApi | None = None,
                 risk_loop=None):
        self.ingest = ingest
        self.alerts = alerts
        self.status = node_status(ingest, alerts_stream, risk_loop)

    _operator_routes(app)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        return self.ingest.render_metrics(request)

    @app.route("/health", methods=["GET"])
    def health(self, request):
        return self.ingest.health(request)

    @app.route("/ready", methods=["GET"])
    def ready(self, request):
        return self.ingest.ready(request)

    @app.route("/status", methods=["GET"])
    def status_page(self, request):
        return self.status.render_html(request)

    @app.route("/status.json", methods=["GET"])
    def status_json(self, request):
        return self.status.render_json(request)

    def site(self, header_timeout: float | None = None) -> Site:
        return side_site(self.app.resource(), header_timeout)


class WorkersSideApp:
    """
    The side listener of a ``--workers N`` supervisor (see :mod:`payflux.supervisor`).

    ``/metrics``: the supervisor's own metrics plus the workers' ingest metrics summed;
    ``/ready``: 200 only when Redis answers and every worker answers its own /ready;
    ``/health``: the supervisor is up;
    ``/status``, ``/status.json``: the status page, from the same summed view as ``/metrics``;
    ``/v1/alerts...``: the alerts API, on the supervisor's own Redis pool.
    """

    app = Klein()

    def __init__(self, workers, ping, content_type: str, alerts: AlertsApi | None = None, risk_loop=None):
        self.workers = workers
        self.ping = ping
        self.content_type = content_type
        self.draining = False
        self.alerts = alerts
        self.status = supervisor_status(workers, risk_loop)

    _operator_routes(app)

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request):
        body = await self.workers.render_metrics()
        request.setHeader(b"Content-Type", self.content_type.encode("ascii"))
        return body

    @app.route("/health", methods=["GET"])
    def health(self, request):
        return json_response(request, 200, {"status": "ok"})

    @app.route("/ready", methods=["GET"])
    async def ready(self, request):
        expected = self.workers.count
        # the workers are asked while Redis is: each step answers within ~50-80 ms, so the
        # whole answer takes no longer than the slower of the two
        asked = ensureDeferred(self.workers.workers_ready()) if not self.draining else None
        refusal = await not_ready(request, self.draining, self.ping)
        if refusal is not None:
            return refusal
        ready = await asked
        if ready < expected:
            request.setHeader(b"Retry-After", b"1")
            return json_response(request, 503, {
                "status": "workers_unavailable", "workers_ready": ready, "workers": expected,
                "message": f"{expected - ready} of {expected} workers did not answer ready (restarting, or "
                           "their own Redis check failed; see the supervisor's log)",
            })
        return json_response(request, 200, {"status": "ready", "workers_ready": ready, "workers": expected})

    @app.route("/status", methods=["GET"])
    def status_page(self, request):
        return self.status.render_html(request)

    @app.route("/status.json", methods=["GET"])
    def status_json(self, request):
        return self.status.render_json(request)

    def site(self, header_timeout: float | None = None) -> Site:
        return side_site(self.app.resource(), header_timeout)

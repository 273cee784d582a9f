"""The OpenAPI document says what the validator and the app really do."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from payflux.cli import sample_event
from payflux.config import OPTIONS
from payflux.events import ALIASES, FIELDS, EventInvalid, EventValidator, ValidationPolicy
from payflux.ingest.app import SMALL_BODY_LIMIT, IngestApp, IngestLimits
from payflux.ingest.errors import ERROR_CODES
from payflux.ingest.openapi import EVENT_SCHEMA, openapi_document
from payflux.ingest.side import SideApp, WorkersSideApp
from payflux.risk.store import OUTCOME_TYPES

ALERT_PATHS = {"/v1/alerts": "get", "/v1/alerts/{alert_id}": "get", "/v1/alerts/{alert_id}/outcome": "post",
               "/v1/risk/processors": "get", "/v1/risk/retry-advice": "get"}  # the side listener's

LIMITS = IngestLimits(65536, 1 << 20, 1000, 50000, 2.0)


class OpenApiTests(SynchronousTestCase):
    def test_event_schema_matches_the_validator(self):
        self.assertEqual(list(EVENT_SCHEMA["properties"]), list(FIELDS) + list(ALIASES))
        for alias in ALIASES:
            self.assertTrue(EVENT_SCHEMA["properties"][alias]["deprecated"])
        validator = EventValidator(ValidationPolicy())
        event = sample_event()
        # every required field in the document is required by the validator, and no other
        for name in FIELDS:
            trimmed = {k: v for k, v in event.items() if k != name}
            try:
                validator.validate(trimmed)
                required = False
            except EventInvalid as e:
                required = any(d["field"] == name and d["code"] == "required" for d in e.details)
            self.assertEqual(required, name in EVENT_SCHEMA["required"], name)
        # the sample event matches every documented pattern and range
        for name, value in validator.validate(event).items():
            prop = EVENT_SCHEMA["properties"][name]
            if "pattern" in prop:
                self.assertRegex(value, prop["pattern"])
            if prop["type"] == "integer":
                self.assertTrue(prop["minimum"] <= value <= prop["maximum"])

    def test_patterns_reject_what_the_validator_rejects(self):
        validator = EventValidator(ValidationPolicy())
        for name, bad in [("currency", "US"), ("processor", "str ipe"), ("merchant_id_hash", "a b"),
                          ("event_id", "has space"), ("geo_bucket", "x" * 33), ("channel", "a@b")]:
            self.assertIsNone(re.match(EVENT_SCHEMA["properties"][name]["pattern"], bad), name)
            with self.assertRaises(EventInvalid):
                validator.validate({**sample_event(), name: bad})

    def test_patterns_accept_what_the_validator_folds_or_treats_as_absent(self):
        validator = EventValidator(ValidationPolicy())
        for name, value in [("currency", "usd"), ("processor", "Stripe"), ("channel", "")]:
            self.assertIsNotNone(re.match(EVENT_SCHEMA["properties"][name]["pattern"], value), name)
            validator.validate({**sample_event(), name: value})

    def test_example_is_the_seed_example_and_valid(self):
        from tests.test_events import SEED_EXAMPLE

        example = EVENT_SCHEMA["example"]
        self.assertEqual(list(example), list(SEED_EXAMPLE))
        self.assertEqual({k: v for k, v in example.items() if k != "event_id"},
                         {k: v for k, v in SEED_EXAMPLE.items() if k != "event_id"})
        EventValidator(ValidationPolicy()).validate(example)

    def test_document_lists_every_route_and_status(self):
        doc = openapi_document(LIMITS)
        routes = {str(rule) for rule in IngestApp.app.url_map.iter_rules()}
        self.assertEqual(routes, set(doc["paths"]) - set(ALERT_PATHS))
        for path in ("/v1/events/payment_exhaust", "/v1/events/payment_exhaust/batch"):
            codes = set(doc["paths"][path]["post"]["responses"])
            self.assertEqual(codes, {"202", "400", "401", "408", "409", "413", "414", "415", "422", "429", "431",
                                     "500", "503"})
        self.assertIn("1000 events", doc["paths"]["/v1/events/payment_exhaust/batch"]["post"]["requestBody"]["description"])

    def test_webhook_paths_take_no_bearer_key_and_list_their_answers(self):
        doc = openapi_document(LIMITS)
        stripe, adyen = (doc["paths"][p]["post"] for p in ("/v1/webhooks/stripe", "/v1/webhooks/adyen"))
        for operation in (stripe, adyen):
            self.assertEqual(operation["security"], [])
            self.assertEqual(set(operation["responses"]), {"200", "400", "401", "404", "408", "413", "414", "431",
                                                           "500", "503"})
            self.assertIn("Retry-After", operation["responses"]["503"]["headers"])
        self.assertEqual([p["name"] for p in stripe["parameters"]], ["Stripe-Signature"])
        self.assertEqual(stripe["responses"]["200"]["content"]["application/json"]["schema"]["example"],
                         {"received": True})
        self.assertEqual(adyen["responses"]["200"]["content"]["text/plain"]["schema"]["enum"], ["[accepted]"])
        self.assertIn("262144 bytes", stripe["requestBody"]["description"])
        self.assertIn("1048576 bytes", adyen["requestBody"]["description"])

    def test_every_operation_has_a_stable_operation_id_and_a_declared_tag(self):
        doc = openapi_document(LIMITS)
        operations = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
        ids = {key: op["operationId"] for key, op in operations.items()}
        # a generated client's function names: renaming one breaks its callers
        self.assertEqual(ids, {
            ("/v1/events/payment_exhaust", "post"): "ingestEvent",
            ("/v1/events/payment_exhaust/batch", "post"): "ingestBatch",
            ("/health", "get"): "getHealth", ("/ready", "get"): "getReady", ("/metrics", "get"): "getMetrics",
            ("/openapi.json", "get"): "getOpenapi",
            ("/v1/alerts", "get"): "listAlerts", ("/v1/alerts/{alert_id}", "get"): "getAlert",
            ("/v1/alerts/{alert_id}/outcome", "post"): "recordAlertOutcome",
            ("/v1/risk/processors", "get"): "getProcessorHealth", ("/v1/risk/retry-advice", "get"): "getRetryAdvice",
            ("/v1/webhooks/stripe", "post"): "receiveStripeWebhook",
            ("/v1/webhooks/adyen", "post"): "receiveAdyenWebhook",
        })
        self.assertEqual(len(set(ids.values())), len(ids))
        for operation_id in ids.values():
            self.assertRegex(operation_id, r"^[a-z]+(?:[A-Z][a-z0-9]*)*$")
        declared = [t["name"] for t in doc["tags"]]
        self.assertEqual(declared, ["ingest", "webhooks", "alerts", "risk", "operations"])
        self.assertTrue(all(t["description"] for t in doc["tags"]))
        used = {tag for op in operations.values() for tag in op["tags"]}
        self.assertEqual(used, set(declared))
        self.assertTrue(all(len(op["tags"]) == 1 for op in operations.values()))

    def test_servers_name_the_ingest_listeners_default(self):
        doc = openapi_document(LIMITS)
        listen = next(o.default for o in OPTIONS if o.name == "listen")
        self.assertEqual(listen, "tcp:8080")
        self.assertEqual([s["url"] for s in doc["servers"]], ["http://localhost:8080"])
        for path in ALERT_PATHS:  # the side listener's operations keep their own
            self.assertEqual(doc["paths"][path][ALERT_PATHS[path]]["servers"][0]["url"], "http://127.0.0.1:9464")

    def test_every_operation_lists_the_http_layers_answers(self):
        """408, 414, 431 (any head), 400 (a bad head), 413 (the path's cap) and 500 on every operation:
        the ingest listener's and the side listener's (the same HTTP layer, payflux/ingest/http.py)."""
        doc = openapi_document(LIMITS)
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                codes = set(operation["responses"])
                self.assertLessEqual({"400", "408", "413", "414", "431", "500"}, codes, path)
                self.assertEqual(list(operation["responses"]), sorted(codes), path)
        outcome = doc["paths"]["/v1/alerts/{alert_id}/outcome"]["post"]["responses"]["413"]["description"]
        self.assertIn("16384 bytes", outcome)
        self.assertIn("8192 bytes", doc["paths"]["/v1/alerts"]["get"]["responses"]["413"]["description"])
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            self.assertIn(f"{SMALL_BODY_LIMIT} bytes", doc["paths"][path]["get"]["responses"]["413"]["description"])
        self.assertEqual(set(doc["paths"]["/ready"]["get"]["responses"]),
                         {"200", "400", "408", "413", "414", "431", "500", "503"})
        self.assertEqual(set(doc["paths"]["/metrics"]["get"]["responses"]),
                         {"200", "400", "404", "408", "413", "414", "431", "500"})
        for path in ("/health", "/openapi.json"):
            self.assertEqual(set(doc["paths"][path]["get"]["responses"]),
                             {"200", "400", "408", "413", "414", "431", "500"})
        single = doc["paths"]["/v1/events/payment_exhaust"]["post"]["responses"]
        self.assertIn("65536 bytes", single["413"]["description"])
        self.assertIn("duplicate_authorization", single["400"]["description"])

    def test_error_code_is_the_registry_as_an_enum(self):
        schemas = openapi_document(LIMITS)["components"]["schemas"]
        self.assertEqual(schemas["Error"]["properties"]["error"], {"$ref": "#/components/schemas/ErrorCode"})
        self.assertEqual(schemas["ErrorCode"]["enum"], list(ERROR_CODES))
        self.assertEqual(schemas["Error"]["properties"]["details"]["items"]["properties"]["code"]["type"], "string")
        detail_code = schemas["Error"]["properties"]["details"]["items"]["properties"]["code"]
        self.assertIn("not an enum", detail_code["description"])


class AlertsApiDocumentTests(SynchronousTestCase):
    def test_alerts_api_paths_are_the_side_listeners_routes_with_admin_security(self):
        doc = openapi_document(LIMITS)
        for app in (SideApp, WorkersSideApp):
            routes = {(str(rule), method) for rule in app.app.url_map.iter_rules() for method in rule.methods
                      if str(rule).startswith("/v1/")}
            self.assertEqual({(r, m) for r, m in routes if m in ("GET", "POST")},
                             {("/v1/alerts", "GET"), ("/v1/alerts/<path:alert_path>", "GET"),
                              ("/v1/alerts/<path:alert_path>", "POST"), ("/v1/risk/processors", "GET"),
                              ("/v1/risk/retry-advice", "GET")})
        self.assertEqual(doc["components"]["securitySchemes"]["admin"]["scheme"], "bearer")
        for path, method in ALERT_PATHS.items():
            operation = doc["paths"][path][method]
            self.assertEqual(operation["security"], [{"admin": []}], path)
            self.assertIn("side listener", operation["servers"][0]["description"])
            self.assertLessEqual({"401", "403", "503"}, set(operation["responses"]), path)
        outcome = doc["paths"]["/v1/alerts/{alert_id}/outcome"]["post"]
        self.assertEqual(set(outcome["responses"]), {"201", "400", "401", "403", "404", "408", "409", "413", "414",
                                                     "415", "422", "431", "500", "503"})
        request = doc["components"]["schemas"]["AlertOutcomeRequest"]
        self.assertEqual(request["properties"]["outcome_type"]["enum"], list(OUTCOME_TYPES))
        self.assertEqual(request["required"], ["outcome_type", "observed_at"])
        listing = {p["name"] for p in doc["paths"]["/v1/alerts"]["get"]["parameters"]}
        self.assertEqual(listing, {"state", "type", "processor", "merchant", "since", "limit", "cursor"})

    def test_risk_feeds_are_documented_with_admin_security(self):
        doc = openapi_document(LIMITS)
        schemas = doc["components"]["schemas"]
        processor = schemas["RiskProcessors"]["properties"]["processors"]["items"]
        self.assertEqual(set(processor["required"]), {"processor", "score", "band", "drivers", "trajectory",
                                                      "sample_size", "insufficient_volume", "merchants", "geos"})
        self.assertEqual(processor["properties"]["band"]["enum"], ["low", "elevated", "high", "critical"])
        self.assertEqual(processor["properties"]["trajectory"]["enum"], ["accelerating", "decelerating", "steady"])
        driver = schemas["HealthDriver"]
        self.assertEqual(set(driver["required"]), {"name", "value", "baseline", "contribution"})
        self.assertEqual(driver["properties"]["name"]["enum"], [
            "high_failure_rate", "retry_pressure_spike", "timeout_clustering", "traffic_volatility",
            "auth_failure_cluster", "geo_entropy_increase"])
        advice = schemas["RetryAdvice"]
        self.assertEqual(advice["properties"]["advice"]["enum"], ["retry", "wait", "avoid"])
        self.assertEqual(set(advice["required"]), {"processor", "failure_category", "advice", "retry_success_rate",
                                                   "baseline", "sample_size", "window_seconds", "as_of"})
        for path in ("/v1/risk/processors", "/v1/risk/retry-advice"):
            operation = doc["paths"][path]["get"]
            self.assertEqual(operation["security"], [{"admin": []}], path)
            self.assertEqual(set(operation["responses"]), {"200", "400", "401", "403", "408", "413", "414", "431",
                                                           "500", "503"}, path)
        params = doc["paths"]["/v1/risk/retry-advice"]["get"]["parameters"]
        self.assertEqual([(p["name"], p["required"]) for p in params], [("processor", True), ("failure_category", True)])

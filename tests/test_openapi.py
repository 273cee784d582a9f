"""The OpenAPI document says what the validator and the app really do."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from payflux.cli import sample_event
from payflux.events import ALIASES, FIELDS, EventInvalid, EventValidator, ValidationPolicy
from payflux.ingest.app import IngestApp, IngestLimits
from payflux.ingest.openapi import EVENT_SCHEMA, openapi_document

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
        self.assertEqual(routes, set(doc["paths"]))
        for path in ("/v1/events/payment_exhaust", "/v1/events/payment_exhaust/batch"):
            codes = set(doc["paths"][path]["post"]["responses"])
            self.assertEqual(codes, {"202", "400", "401", "409", "413", "415", "422", "429", "503"})
        self.assertIn("1000 events", doc["paths"]["/v1/events/payment_exhaust/batch"]["post"]["requestBody"]["description"])

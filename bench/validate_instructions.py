"""Instructions per event of decode_batch_body + validate_batch on validate_micro's batch.

Repeatable on a shared box (wall-clock timings there vary 2x): run it under callgrind with N = 1
and N = 5 and divide the difference by 2,000 events (4 batches of 500):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/validate_instructions.py 1
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/validate_instructions.py 5
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.validate_micro import make_event  # noqa: E402
from payflux.events import EventValidator, ValidationPolicy, decode_batch_body  # noqa: E402

rng = random.Random(1)
batch = [make_event(rng, i) for i in range(500)]
ndjson = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in batch)
v = EventValidator(ValidationPolicy(), now=lambda: 1.9e9)
for _ in range(int(sys.argv[1])):
    items = decode_batch_body(ndjson, "ndjson")
    rows, invalid = v.validate_batch(items)[:2]
    assert not invalid and len(rows) == 500, invalid[:1]

"""
CPU per single-event request of the ingest fast path + IngestApp (auth, rate check, decode,
validation, PAN guard, canonical JSON, fingerprint, metrics, the 202 body) with a writer that
answers at once: what a request costs PayFlux before Redis, the reactor and the sockets.

    python bench/ingest_micro.py [CHECKOUT] [--requests 20000]

CHECKOUT (default: this repository) is put first on sys.path, so a worktree of another
commit can be compared.  Process CPU time over N requests fed to one connection.
"""
import argparse
import os
import sys
import time
import uuid

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("checkout", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap.add_argument("--requests", type=int, default=20000)
cli = ap.parse_args()
sys.path.insert(0, cli.checkout)
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from payflux.events import EventValidator, ValidationPolicy
from payflux.ingest.app import IngestApp, IngestLimits
from payflux.ingest.auth import Authenticator
from payflux.ingest.ratelimit import RateLimiter
from payflux.ingest.fastpath import FastIngestFactory
from payflux.observability.metrics import Metrics
from payflux.configbase import ApiKey
from payflux.streams.writer import AppendResult

class W:
    def append(self, prepared, ms):
        return succeed([AppendResult("1-0", False) for _ in prepared])
clock = Clock(); clock.advance(time.time())
app = IngestApp(validator=EventValidator(ValidationPolicy(300, "drop", False), now=time.time), writer=W(),
    authenticator=Authenticator([ApiKey("bench", b"bench-key-0123456789abcdef")]), limiter=RateLimiter(0, 0, clock.seconds),
    metrics=Metrics(), limits=IngestLimits(65536, 1 << 20, 1000, 100000, 1.0), ping=None, seconds=time.time)
class Site: timeOut = 60
f = FastIngestFactory(app, Site(), clock)
p = f.buildProtocol(None); t = StringTransport(); p.makeConnection(t)
def req(i):
    body = ('{"event_type":"payment_failed","event_timestamp":"2026-01-06T00:00:00Z","event_id":"%s",'
      '"merchant_id_hash":"m_%05d_hash","payment_intent_id_hash":"pi_%09d_hash","processor":"stripe",'
      '"failure_category":"card_declined","retry_count":1,"geo_bucket":"US","amount_bucket":"50-200",'
      '"system_source":"checkout_api","payment_method_bucket":"credit_card","channel":"web",'
      '"retry_result":"failed","failure_origin":"processor"}' % (uuid.uuid4(), i % 97, i)).encode()
    return (b"POST /v1/events/payment_exhaust HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer bench-key-0123456789abcdef\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
N = cli.requests
reqs = [req(i) for i in range(N)]
t0 = time.process_time()
for r in reqs:
    p.dataReceived(r)
    t.clear()
dt = time.process_time() - t0
assert t.value() == b"" and app.metrics.events_accepted.labels("bench")._value.get() == N, "not every request was accepted"
print(f"{dt / N * 1e6:.1f} us CPU per request (fast path + app, writer answering at once; {N} requests, {cli.checkout})")

"""
The risk alerting consumer (built-in handler ``risk``): sliding-window detectors over the
payment-event stream (failure-rate spikes, retry storms, failure clustering) that open and
resolve alerts.  ``engine``/``detectors``/``windows`` are the pure core (no Twisted),
``handler`` adapts consumer entries to it, ``sinks`` and ``metrics`` deliver alerts.
Operator guide: docs/risk.md.
"""

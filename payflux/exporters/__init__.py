"""
Exporters: consumer handlers that deliver stream entries to another system.

Each exporter is a built-in handler (``handler = "file"``, ``"webhook"``, ``"kafka"``,
``"parquet"`` in a ``[[consumers]]`` table; options in its ``options`` table) running on the
consumer runtime, so delivery is at-least-once: a batch is acknowledged only after the
destination confirmed it, and a batch that fails stays pending for reclaim and, after
``max_deliveries``, the dead-letter stream.  Exporters count what they do in
:class:`payflux.exporters.metrics.ExporterStats`.
"""

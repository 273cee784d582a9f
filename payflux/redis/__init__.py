"""
All of PayFlux's Redis access, in three layers (docs/architecture.md):

- bottom, pure: :mod:`~payflux.redis.target` (targets, the URL grammar),
  :mod:`~payflux.redis.slots`, :mod:`~payflux.redis.resp`, :mod:`~payflux.redis.replies` (the
  outage classifier), :mod:`~payflux.redis.steps`, :mod:`~payflux.redis.scripts` (the NOSCRIPT
  path), :mod:`~payflux.redis.discovery` (asking the sentinels);
- middle: :mod:`~payflux.redis.txadapter` (the only module touching txredisapi internals), the
  async clients :mod:`~payflux.redis.cluster` and :mod:`~payflux.redis.sentinel`, and the CLI's
  blocking clients :mod:`~payflux.redis.sync`;
- top: :mod:`~payflux.redis.connect` (``connect()``, ``open_sync()``).

This file imports nothing, so importing a bottom module never loads the layers above it.
"""

#!/bin/sh
# Launch the FastAPI peer the way bench/run.py does.
# Env: PEER_API_KEY (required), PEER_REDIS_URL, PORT (default 8090), WORKERS (default 1).
# Run from the repository root so that `bench.fastapi_peer.app` is importable.
set -eu
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" -m uvicorn bench.fastapi_peer.app:app \
    --host 127.0.0.1 --port "${PORT:-8090}" --workers "${WORKERS:-1}" \
    --loop uvloop --http httptools --no-access-log --log-level warning

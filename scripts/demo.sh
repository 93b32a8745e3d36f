#!/usr/bin/env bash
# The main job end to end on the embedded PostGIS (or PGGEOLEARN_DSN): installs what is missing
# (see setup.sh), then `pggeolearn demo` — synthetic scene (or --data ../shared/data/banepa),
# dataset in SQL, chips, training, prediction, QGIS-ready tables. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/pggeolearn" demo "$@"

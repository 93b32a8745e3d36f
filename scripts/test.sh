#!/usr/bin/env bash
# Run the test suite: installs what is missing (see setup.sh), then pytest against a real
# PostgreSQL + PostGIS (the embedded cluster in a temp dir, or PGGEOLEARN_TEST_DSN).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGGEOLEARN_TEST_DEPS=1 source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# The installed wheel is what is tested (pytest, not python -m pytest, keeps the source tree
# off sys.path), so sql/ and migrations/ must ship inside it.
exec "$VENV/bin/pytest" "$@"

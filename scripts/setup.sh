#!/usr/bin/env bash
# Install what pggeolearn needs on Debian/Ubuntu, idempotently: PostgreSQL 15 + PostGIS 3 +
# GDAL tools (apt, when missing and we may), a venv in .venv, and the project with the test and
# plot extras (matplotlib: train --plot, the demo's curves).
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGGEOLEARN_VENV:-$ROOT/.venv}"
APT_PACKAGES=(postgresql-15 postgresql-15-postgis-3 postgis gdal-bin osm2pgsql)
# Only for the tests (scripts/test.sh sets PGGEOLEARN_TEST_DEPS=1): headless QGIS, whose Python
# bindings run under Debian's /usr/bin/python3 (tests/qgis/ opens every output with it).
TEST_APT_PACKAGES=(python3-qgis qgis-providers)
if [ "${PGGEOLEARN_TEST_DEPS:-0}" = 1 ]; then APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}"); fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "== installing ${missing[*]} (apt)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system cluster on port 5432; pggeolearn uses its own, so leave it alone.
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# torch: the CPU build, pinned (an open range pulls a multi-GB CUDA build)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0
echo "== installing pggeolearn into $VENV"
"$VENV/bin/pip" install -q "$ROOT[test,plot]"
export PATH="$VENV/bin:$PATH"

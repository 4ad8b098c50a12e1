#!/usr/bin/env bash
# The unit passes `systemd-analyze verify` and rates 2.0 or lower in
# `systemd-analyze security --offline=yes`. Skipped (exit 77) where systemd-analyze is missing.
# usage: check_unit.sh UNIT_TEMPLATE BIN_DIR
set -euo pipefail
template=$1 bindir=$2
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not installed: skipped"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|@CONFLUX_BINDIR@|$bindir|g" -e "s|@CONFLUX_DOCDIR@|$work|g" "$template" >"$work/confluxd.service"
touch "$work/README.md"
if ! out=$(systemd-analyze verify "$work/confluxd.service" 2>&1) || [ -n "$out" ]; then
  echo "systemd-analyze verify failed:"; echo "$out"; exit 1
fi
score=$(systemd-analyze security --offline=yes "$work/confluxd.service" 2>&1 | sed -n 's/.*Overall exposure level for confluxd.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "no exposure score"; systemd-analyze security --offline=yes "$work/confluxd.service"; exit 1; }
echo "exposure level: $score"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "exposure $score is above 2.0"; exit 1; }

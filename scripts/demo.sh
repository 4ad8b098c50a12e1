#!/usr/bin/env bash
# The built-in demo: builds Conflux, generates a small synthetic base model and two agents with
# Conflux's own generator, and validates and lists the base checkpoint with `conflux inspect`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/conflux-demo-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "== generating a synthetic base model and 2 agents (bf16, sharded) in $work"
build/bin/conflux-synth --out "$work" --preset tiny --agents 2 --shard-size 200KB
echo "== conflux inspect $work/base"
build/bin/conflux inspect "$work/base"

#!/usr/bin/env bash
# The built-in demo of Conflux's main job: confluxd watches three agents' training runs and,
# each time an agent lands a new complete checkpoint, re-merges them (RAM+) and publishes a new
# version atomically. Everything happens in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
bin=$PWD/build/bin
work=$(mktemp -d "${TMPDIR:-/tmp}/conflux-demo-XXXXXX")
cleanup() {
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  [ -n "${tailer:-}" ] && kill "$tailer" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== generating a base model and checkpoints for 3 agents (bf16, Qwen2-style shapes)"
"$bin/conflux-synth" --out "$work/src1" --preset small --agents 3 --seed 1 --agent-seed 1
"$bin/conflux-synth" --out "$work/src2" --preset small --agents 3 --seed 1 --agent-seed 2  # a later round
mv "$work/src1/base" "$work/base"
mkdir -p "$work/runs/coder" "$work/runs/tool" "$work/runs/memory"

cat >"$work/confluxd.toml" <<TOML
[daemon]
control_socket = "control.sock"
state_dir      = "state"
rescan         = "2s"

[[job]]
name     = "agents"
strategy = "ram"                 # RAM+: unique entries rescaled, shared ones averaged
base     = "base"
models   = ["runs/coder", "runs/tool", "runs/memory"]   # run dirs: the newest complete checkpoint of each
output   = "merged"              # versions merged/000001, ... and merged/latest
settle   = "1s"                  # a checkpoint must stop changing for 1 s
keep     = 3
[job.params]
r = 0.1
TOML
echo "== the daemon's configuration ($work/confluxd.toml)"
grep -v '^$' "$work/confluxd.toml"

echo
echo "== starting confluxd (its log follows)"
cd "$work"
"$bin/confluxd" --config confluxd.toml 2>"$work/confluxd.log" &
daemon=$!
tail -n +1 -f "$work/confluxd.log" | sed -u 's/^/   confluxd| /' &
tailer=$!
sleep 1

land() {  # land SRC RUN NAME: write a checkpoint under a temporary name, rename it into place
  cp -r "$1" "$work/runs/$2/tmp-$3"
  mv "$work/runs/$2/tmp-$3" "$work/runs/$2/$3"
  echo "== landed runs/$2/$3"
}
wait_runs() {  # wait until the job has finished N runs
  for _ in $(seq 1 100); do
    status=$("$bin/conflux" status --config confluxd.toml --json)
    if grep -q "\"runs\":$1," <<<"$status" && grep -q '"state":"idle"' <<<"$status"; then return 0; fi
    sleep 0.2
  done
  echo "demo: the merge did not happen in time" >&2
  return 1
}

land "$work/src1/agent-1" coder checkpoint-100
land "$work/src1/agent-2" tool checkpoint-100
sleep 1.5
echo "== status while one agent is still missing:"
"$bin/conflux" status --config confluxd.toml | sed 's/^/   /'
land "$work/src1/agent-3" memory checkpoint-100
wait_runs 1
land "$work/src2/agent-1" coder checkpoint-200
wait_runs 2
land "$work/src2/agent-2" tool checkpoint-200
wait_runs 3
sleep 0.3

echo
echo "== conflux status"
"$bin/conflux" status --config confluxd.toml | sed 's/^/   /'
echo
echo "== published versions (merged/latest is swapped atomically)"
ls -l "$work/merged" | sed 's/^/   /'
echo
echo "== conflux inspect merged/latest (first lines)"
"$bin/conflux" inspect "$work/merged/latest" | head -n 4 | sed 's/^/   /'
kill "$daemon"
wait "$daemon" || true
daemon=
sleep 0.2

#!/usr/bin/env bash
# The built-in demo: builds Conflux, generates a small synthetic base model and three RL-style
# agents (sparse task vectors) with Conflux's own generator, merges them with `conflux merge`,
# and shows the merged checkpoint and its provenance manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
bin=$PWD/build/bin
work=$(mktemp -d "${TMPDIR:-/tmp}/conflux-demo-XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== 1. generating a base model and 3 agents (bf16, Qwen2-style shapes) in $work"
"$bin/conflux-synth" --out "$work" --preset small --agents 3 --density 0.05 --shared 0.01

strategy=task_arithmetic
params='weights = [1.0, 1.0, 1.0]'
if "$bin/conflux" plugins --json | grep -q '"id":"ram"'; then
  strategy=ram
  params=$'r = 0.1        # RAM+: rescale unique entries by 1 + r * clip(rho, 0, alpha)\nalpha = 2.0'
fi
cat >"$work/job.toml" <<TOML
[[job]]
name     = "demo"
strategy = "$strategy"
base     = "base"
models   = ["agent-1", "agent-2", "agent-3"]
output   = "merged"
out_dtype = "bf16"
[job.params]
$params
TOML
echo
echo "== 2. the job ($work/job.toml)"
cat "$work/job.toml"
echo
echo "== 3. conflux merge"
"$bin/conflux" merge "$work/job.toml"
echo
echo "== 4. conflux inspect merged (first lines)"
"$bin/conflux" inspect "$work/merged" | head -n 8
echo
echo "== 5. provenance: $work/merged/conflux-manifest.json (excerpt)"
python3 - "$work/merged/conflux-manifest.json" 2>/dev/null <<'PY' || head -c 600 "$work/merged/conflux-manifest.json"
import json, sys
m = json.load(open(sys.argv[1]))
print("strategy:", m["strategy"]["id"], m["strategy"]["version"], " params:", json.dumps(m["params"]))
for i in m["inputs"]:
    print(f'  {i["role"]:5} {i["path"]}  header sha256 {i["files"][0]["header_sha256"][:16]}...')
if "report" in m:
    print("report:", json.dumps(m["report"])[:400])
PY

#!/usr/bin/env bash
# scripts/fuzz.sh SECONDS: builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/
# and runs each for SECONDS. Fails on any finding; prints how many inputs each target executed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
scripts/setup.sh
cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DCONFLUX_FUZZ=ON -DCONFLUX_BUILD_TESTS=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target fuzz_safetensors_header fuzz_checkpoint_index

corpus=build-fuzz/corpus
mkdir -p "$corpus/header" "$corpus/index"
le64() {  # the 8-byte little-endian length prefix of a safetensors file
  local n=$1 i
  for i in 0 1 2 3 4 5 6 7; do printf "\\$(printf '%03o' $((n & 255)))"; n=$((n >> 8)); done
}
seed() {  # seed FILE HEADER [DATA-BYTES]: a safetensors file with the given header, zero data
  { le64 ${#2}; printf '%s' "$2"; head -c "${3:-0}" /dev/zero; } >"$1"
}
seed "$corpus/header/valid" '{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}' 16
seed "$corpus/header/empty" '{}      '
seed "$corpus/header/zero" '{"z":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
printf '%s' '{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}' >"$corpus/index/valid"

status=0
for pair in fuzz_safetensors_header:header fuzz_checkpoint_index:index; do
  target=${pair%%:*} dir=$corpus/${pair#*:}
  log=build-fuzz/$target.log
  if ! build-fuzz/bin/$target -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
      -rss_limit_mb=2048 -artifact_prefix=build-fuzz/ "$dir" >"$log" 2>&1; then
    status=1
    echo "fuzz.sh: $target found a crash; see $log" >&2
    tail -n 40 "$log" >&2
  fi
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}')
  echo "fuzz.sh: $target executed ${runs:-?} inputs in ${seconds}s"
done
exit $status

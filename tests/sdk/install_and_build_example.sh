#!/usr/bin/env bash
# usage: install_and_build_example.sh BUILD_DIR SOURCE_DIR
#
# Proves the SDK works for a third party, end to end:
#   1. installs the build tree (`cmake --install`) into a temporary prefix;
#   2. configures and builds sdk/examples/template out of tree against the installed ConfluxSDK
#      package (find_package(ConfluxSDK 1.0) + conflux_add_plugin), checks example_scale_delta.so;
#   3. makes checkpoints with conflux-synth and merges them with strategy example_scale_delta using
#      the INSTALLED conflux (CONFLUX_PLUGIN_PATH = the example's build dir), then inspects the
#      output and checks `conflux plugins` lists the installed built-ins and the example.
# The installation is staged with DESTDIR under the temporary directory, so an install rule with an
# absolute destination can never write outside it. Everything is removed on exit. Exits non-zero
# with a message naming the failed step. Environment: CMAKE (cmake to use), CXX (compiler).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BUILD_DIR SOURCE_DIR" >&2
  exit 2
fi
[[ -f "$1/CMakeCache.txt" ]] || { echo "sdk_install_example: FAILED: $1 is not a CMake build directory" >&2; exit 1; }
[[ -f "$2/sdk/examples/template/CMakeLists.txt" ]] || { echo "sdk_install_example: FAILED: $2 is not the Conflux source tree" >&2; exit 1; }
build=$(cd "$1" && pwd -P)
src=$(cd "$2" && pwd -P)
cmake_bin=${CMAKE:-cmake}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/conflux-sdk-test.XXXXXX")
tmp=$(cd "$tmp" && pwd -P)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

step=""
fail() {
  echo "sdk_install_example: FAILED: $*" >&2
  if [[ -s "$tmp/log" ]]; then
    echo "---- output of the failed step ----" >&2
    tail -n 60 "$tmp/log" >&2
  fi
  exit 1
}
# run STEP-DESCRIPTION CMD...: runs CMD with its output in $tmp/log; fails naming the step.
run() {
  step=$1
  shift
  echo "sdk_install_example: $step"
  "$@" >"$tmp/log" 2>&1 || fail "$step (exit $?): $*"
}

# 1. Install.
prefix_name=/conflux-prefix
prefix="$tmp/stage$prefix_name"
run "install $build into a temporary prefix" env DESTDIR="$tmp/stage" "$cmake_bin" --install "$build" --prefix "$prefix_name"
for f in bin/conflux bin/conflux-synth include/conflux/plugin.h include/conflux/plugin.hpp \
         lib/conflux/plugins/linear.so lib/conflux/plugins/task_arithmetic.so lib/conflux/plugins/passthrough.so; do
  [[ -e "$prefix/$f" ]] || fail "the install has no $f (under $prefix)"
done
config=$(find "$prefix" -name ConfluxSDKConfig.cmake -print -quit)
[[ -n "$config" ]] || fail "the install has no ConfluxSDKConfig.cmake (under $prefix)"

# 2. Build the template plugin out of tree against the installed SDK only.
example_build="$tmp/example-build"
configure=("$cmake_bin" -S "$src/sdk/examples/template" -B "$example_build" -DCMAKE_BUILD_TYPE=Release
           -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if [[ -n "${CXX:-}" ]]; then configure+=(-DCMAKE_CXX_COMPILER="$CXX"); fi
run "configure sdk/examples/template against the installed ConfluxSDK" "${configure[@]}"
grep -qF "ConfluxSDK_DIR:PATH=$prefix/" "$example_build/CMakeCache.txt" ||
  fail "the example did not find ConfluxSDK in the temporary prefix: $(grep ConfluxSDK_DIR "$example_build/CMakeCache.txt")"
run "build sdk/examples/template" "$cmake_bin" --build "$example_build"
plugin=$(find "$example_build" -name example_scale_delta.so -print -quit)
[[ -n "$plugin" ]] || fail "the example build produced no example_scale_delta.so"
plugin_dir=$(dirname "$plugin")
# Only the entry point is exported.
if command -v nm >/dev/null; then
  exported=$(nm -D --defined-only "$plugin" | awk '$2 ~ /^[TDBRVW]$/ {print $3}')
  [[ "$exported" == "conflux_plugin_entry" ]] || fail "example_scale_delta.so exports more than the entry point: $exported"
fi

# 3. Merge with the installed conflux.
conflux="$prefix/bin/conflux"
run "generate checkpoints with conflux-synth" "$build/bin/conflux-synth" --out "$tmp/ck" --preset tiny --agents 2
cat >"$tmp/job.toml" <<EOF
[[job]]
name = "example"
strategy = "example_scale_delta"
base = "$tmp/ck/base"
models = ["$tmp/ck/agent-1", "$tmp/ck/agent-2"]
output = "$tmp/merged"

[job.params]
factor = 0.5
EOF
export CONFLUX_PLUGIN_PATH="$plugin_dir"
run "conflux merge with example_scale_delta (installed conflux)" "$conflux" merge "$tmp/job.toml"
[[ -d "$tmp/merged" ]] || fail "conflux merge exited 0 but wrote no $tmp/merged"
run "conflux inspect the merged checkpoint" "$conflux" inspect "$tmp/merged"

run "conflux plugins" "$conflux" plugins
listing="$tmp/plugins.txt"
cp "$tmp/log" "$listing"
for id in example_scale_delta linear task_arithmetic passthrough; do
  grep -q "^$id " "$listing" || fail "conflux plugins does not list $id: $(cat "$listing")"
done
for id in linear task_arithmetic passthrough; do
  grep -qF "file: $prefix/lib/conflux/plugins/$id.so" "$listing" ||
    fail "conflux plugins does not take $id from the installed $prefix/lib/conflux/plugins: $(cat "$listing")"
done
grep -qF "file: $plugin_dir/example_scale_delta.so" "$listing" ||
  fail "conflux plugins does not take example_scale_delta from $plugin_dir: $(cat "$listing")"
grep -q "factor" "$listing" || fail "conflux plugins does not show example_scale_delta's parameter factor"
if grep -q "warning" "$listing"; then fail "conflux plugins reports problems: $(cat "$listing")"; fi

# A parameter out of the schema's range (factor >= 0) is refused before any tensor is read.
sed -i 's/^factor = 0.5$/factor = -1.0/' "$tmp/job.toml"
rm -rf "$tmp/merged"
step="conflux merge with factor = -1"
if "$conflux" merge "$tmp/job.toml" >"$tmp/log" 2>&1; then fail "$step succeeded; the range check was not applied"; fi
grep -q "factor" "$tmp/log" || fail "$step: the error does not name the parameter: $(cat "$tmp/log")"

echo "sdk_install_example: OK (installed SDK builds the template; installed conflux merges with it)"

#!/usr/bin/env bash
# Installs the Debian packages Conflux needs to build, test and fuzz. Idempotent: installs only
# what is missing. Runs as root, or through sudo otherwise.
set -euo pipefail

packages=(
  g++ cmake make pkg-config
  libboost1.81-dev libboost-json1.81-dev libboost-program-options1.81-dev
  libtomlplusplus-dev libtbb-dev libhwy-dev libgtest-dev libgmock-dev libsystemd-dev libssl-dev
  clang libclang-rt-14-dev   # libFuzzer targets (scripts/fuzz.sh)
  systemd                    # systemd-analyze, for the unit's checks
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "setup.sh: need root or sudo to install: ${missing[*]}" >&2
  exit 1
fi
echo "setup.sh: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# System packages the suite uses when it can:
# - slurmctld, slurmd and munge, for the two-node Slurm that tests/helpers/slurm_cluster.py emulates on this machine;
# - tuxpaint-stamps-default and fonts-noto-color-emoji, the sources of the study set (pipeline/data/study.py).
# Tests that need them skip with the reason when this cannot install them (not root, no apt).
set -u
missing=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  || missing+=(slurmctld slurmd slurm-client munge)
[ -d /usr/share/tuxpaint/stamps ] || missing+=(tuxpaint-stamps-default)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_system_deps: not root or no apt-get; tests needing ${missing[*]} will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null \
  || echo "install_system_deps: apt-get failed; tests needing ${missing[*]} will skip" >&2
exit 0

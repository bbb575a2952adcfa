#!/usr/bin/env bash
# System packages the suite uses when it can: slurmctld, slurmd and munge, for the two-node Slurm that
# tests/slurm_cluster.py emulates on this machine.
# Tests that need them skip with the reason when this cannot install them (not root, no apt).
set -u
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_system_deps: not root or no apt-get; Slurm tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
  || echo "install_system_deps: apt-get failed; Slurm tests will skip" >&2
exit 0

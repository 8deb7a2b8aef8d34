#!/usr/bin/env bash
# Install what the SLURM launcher tests need: Debian's SLURM 22.05 daemons and client
# (slurmctld, slurmd, slurm-client) and munge. Run as root on Debian 12 (CI runs it
# from .ci/run). Idempotent: returns at once when everything is installed.
# Measured on the CI machine kind (2 cores): about 20 s from nothing.
#
# It only installs: nothing is started and nothing under /etc is configured. The
# tests start a private cluster (tests/e2e/slurm_cluster.py) with its own config,
# munge key and ports, and stop it when done. Debian's postinst scripts try to start
# the services and, with no init system, say they could not: that is expected.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  echo "setup_local_slurm: ${packages[*]} already installed"
  exit 0
fi
if ((EUID != 0)); then
  echo "setup_local_slurm: installing ${missing[*]} needs root (apt-get)" >&2
  exit 1
fi
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup_local_slurm: installed ${missing[*]} in $((SECONDS - start)) s"

#!/usr/bin/env bash
# Slurm and munge from Debian's packages, for tests/launch/test_slurm.py (run by `make test`).
# Only as root with apt-get; otherwise says why and exits 0 (the test then skips). Idempotent.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: not root or no apt-get; the Slurm test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd \
         slurm-client munge >/dev/null; }
# the packages' services are not started here (no systemd); commlib.launch.slurm runs its own daemons

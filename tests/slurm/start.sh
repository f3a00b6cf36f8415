#!/bin/bash
# Start munged + slurmctld + slurmd for a one-node test cluster under $BASE (slurm.conf already written there).
# No systemd needed; every daemon writes a pid file that stop.sh uses. As root (Debian's munge user runs munged).
set -euo pipefail
BASE=${BASE:?set BASE to the cluster folder}
export SLURM_CONF=$BASE/slurm.conf
mkdir -p "$BASE"/{state,spool/slurmd.localhost,log,run}
# munged refuses a socket folder others cannot traverse; the key must belong to the munge user, mode 600.
install -d -o munge -g munge -m 711 "$BASE/munge"
[ -f "$BASE/munge/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$BASE/munge/munge.key"
runuser -u munge -- munged --socket="$BASE/munge/munge.socket" --key-file="$BASE/munge/munge.key" \
  --log-file="$BASE/munge/munged.log" --pid-file="$BASE/munge/munged.pid" --seed-file="$BASE/munge/munged.seed"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost  # NodeName in slurm.conf is "localhost", not this host's name
for _ in $(seq 150); do
  [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && exit 0
  sleep 0.2
done
echo "the test node did not become idle; logs in $BASE/log" >&2
sinfo >&2 || true
exit 1

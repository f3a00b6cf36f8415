#!/bin/bash
# Stop the test cluster's daemons by the PIDs in their pid files (never by name: other clusters may run here).
BASE=${BASE:?set BASE to the cluster folder}
pids=""
for f in "$BASE"/run/slurmd.*.pid "$BASE"/run/slurmctld.pid "$BASE"/munge/munged.pid; do
  [ -f "$f" ] || continue
  p=$(cat "$f")
  kill "$p" 2>/dev/null && pids="$pids $p"
done
for _ in $(seq 100); do
  alive=0
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.1
done
echo "stopped:$pids"

#!/usr/bin/env bash
# Bring a whole federation up on localhost: a coordinator and three hospitals over TLS
# with node authentication, run a short study, shut everything down (also on failure).
# Usage: sites_example/federation/run_federation.sh   (after `make demo` or `make install`)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
medgan="$root/.venv/bin/medgan"
[ -x "$medgan" ] || { echo "run 'make install' first (no $medgan)"; exit 1; }
cd "$here"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "federation stopped"
}
trap cleanup EXIT INT TERM

[ -f "$root/sites_example/data/study.json" ] || "$medgan" sites simulate --sites 3 --out "$root/sites_example/data" --subjects 12 --slices 12
[ -f certs/ca.crt ] || "$medgan" certs init --out certs --san localhost --san 127.0.0.1
for site in hospital-a hospital-b hospital-c; do
  [ -f "keys/$site" ] || "$medgan" site keys --name "$site" --out keys
done

echo "== coordinator"
setsid "$medgan" server start --config coordinator.toml > coordinator.log 2>&1 & pids+=($!)
for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 1; done
for site in hospital-a hospital-b hospital-c; do
  "$medgan" server register "keys/$site.pub" --config coordinator.toml || true  # already registered: fine
done

echo "== hospitals"
for site in hospital-a hospital-b hospital-c; do
  setsid "$medgan" site start --config "$site.toml" > "$site.log" 2>&1 & pids+=($!)
done
for site in hospital-a hospital-b hospital-c; do
  for _ in $(seq 60); do grep -q "SuperNode ID" "$site.log" && break; sleep 1; done
  grep -q "SuperNode ID" "$site.log" || { echo "$site did not connect:"; tail -20 "$site.log"; exit 1; }
done

echo "== study"
"$medgan" run --config study.toml --federation coordinator.toml
"$medgan" privacy report runs/federation | tail -5
echo "report: $here/runs/federation/report.md"

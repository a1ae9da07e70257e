#!/usr/bin/env bash
# A scanner fleet on one machine, with one command:
#
#   nodes/scanner-fleet/run.sh            # run 20 scans, print results and stats, stop
#   nodes/scanner-fleet/run.sh --keep     # ... then leave the fleet running until Ctrl-C
#
# Creates throw-away certificates, starts a submitter node and three scanner nodes on
# 127.0.0.1 (free ports), one `zmesh jobs work scan -- ./toy-scan.sh` worker on each scanner
# node, submits SCANS (default 20) targets with `zmesh jobs submit scan --wait` on the
# submitter, prints each result and `zmesh jobs stats`. Everything it started is stopped on
# exit, error or Ctrl-C, and its temporary directory removed.
#
# Environment: ZMESH (default: `zmesh` if on PATH, else `python3 -m zmesh`), PYTHON (python3),
# SCANS (20).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
if [[ -z "${ZMESH:-}" ]]; then
    if command -v zmesh >/dev/null; then ZMESH=zmesh; else ZMESH="$PYTHON -m zmesh"; fi
fi
read -r -a Z <<<"$ZMESH"   # the command, as words
SCANS=${SCANS:-20}
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/scanner-fleet.XXXXXX")
PIDS=()
cleanup() {
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        kill -TERM "${PIDS[@]}" 2>/dev/null || true   # nodes stop cleanly on SIGTERM
        wait "${PIDS[@]}" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo; echo "stopping the fleet"; exit 130' INT TERM

NAMES=(submitter scanner1 scanner2 scanner3)
echo "certificates in $WORK/certs"
for name in "${NAMES[@]}"; do
    "${Z[@]}" certs create "$name" --dir "$WORK/certs" >/dev/null
done

# Each node binds free loopback ports (port 0) and writes the ones it got to a ready file
# (what a supervisor reads): no port is picked here and raced for.
declare -A CONTROL MQTT
start_node() {  # NAME [--peer HOST:PORT]
    local name=$1
    shift
    "${Z[@]}" node run --name "$name" --cert "$WORK/certs/$name.key_secret" \
        --listen 127.0.0.1:0 --mqtt 127.0.0.1:0 --ready-file "$WORK/$name.ready" "$@" \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}
wait_ready() {  # NAME: wait (bounded) for its ready file, then read its ports
    local name=$1 try
    for ((try = 0; try < 300; try++)); do
        if [[ -s "$WORK/$name.ready" ]]; then
            read -r CONTROL[$name] MQTT[$name] < <("$PYTHON" -c \
                'import json, sys; r = json.load(open(sys.argv[1])); print(r["control_port"], r["mqtt_port"])' \
                "$WORK/$name.ready")
            echo "node $name: control 127.0.0.1:${CONTROL[$name]}, MQTT 127.0.0.1:${MQTT[$name]}"
            return
        fi
        sleep 0.1
    done
    echo "node $name did not start; its log:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}

start_node submitter
wait_ready submitter
for name in scanner1 scanner2 scanner3; do
    start_node "$name" --peer "127.0.0.1:${CONTROL[submitter]}"   # one seed: the rest is learned
done
for name in scanner1 scanner2 scanner3; do
    wait_ready "$name"
done

for name in scanner1 scanner2 scanner3; do
    SCANNER=$name "${Z[@]}" jobs work scan -p "${MQTT[$name]}" -- "$HERE/toy-scan.sh" 2>>"$WORK/$name-worker.log" &
    PIDS+=($!)
done
echo "three scanners working queue 'scan'; submitting $SCANS scans on the submitter"
echo

# Each submit waits for its result; they run side by side and are printed in order. Jobs
# submitted before a scanner is known simply wait in the queue.
SUBMITS=()
for ((i = 1; i <= SCANS; i++)); do
    "${Z[@]}" jobs submit scan -p "${MQTT[submitter]}" -m "10.0.0.$i" --wait -W 60 >"$WORK/result-$i" 2>&1 &
    SUBMITS+=($!)
done
failed=0
for ((i = 1; i <= SCANS; i++)); do
    wait "${SUBMITS[$((i - 1))]}" || failed=$((failed + 1))
    cat "$WORK/result-$i"
done

echo
"${Z[@]}" jobs stats -p "${MQTT[submitter]}"
echo
"${Z[@]}" peers -p "${MQTT[submitter]}"

if ((KEEP)); then
    echo
    echo "The fleet keeps running; Ctrl-C stops it. Try:"
    echo "  ${ZMESH} jobs submit scan -p ${MQTT[submitter]} -m 192.168.1.1 --wait"
    echo "  ${ZMESH} jobs stats -p ${MQTT[submitter]}"
    wait
fi
if ((failed)); then
    echo "$failed scan(s) failed" >&2
    exit 1
fi

#!/bin/sh
# A stand-in for a real scanner (nmap, a SAST tool, a container scanner...), run by
# `zmesh jobs work scan -- ./toy-scan.sh` once per job: the target arrives on stdin, the job
# id in $ZMESH_JOB_ID; what it prints is the job's result, and a non-zero exit fails the job
# (it is retried elsewhere, then dead-lettered).
read -r target
# "Scanning" takes 50-300 ms.
sleep "$(printf '0.%02d' $(( $(od -An -N1 -tu1 /dev/urandom) % 26 + 5 )))"
set -- "open port 22/tcp (OpenSSH 8.9)" "TLS certificate expires in 12 days" \
       "HTTP server banner leaks its version" "no findings" "open port 5432/tcp (PostgreSQL)"
shift "$(( $(od -An -N1 -tu1 /dev/urandom) % $# ))"
echo "$target: $1 (scanned on ${SCANNER:-?})"

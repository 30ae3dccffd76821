#!/usr/bin/env bash
# Makes a local certificate authority and one certificate per service for mTLS on the local stack
# (ECDSA P-256: gRPC's TLS stack does not offer Ed25519 signatures in certificates).
#
#   deploy/local/certs.sh [out-dir]     default: $GRISTMILL_RUN_DIR/certs (.run/certs)
#
# Writes ca.pem/ca.key and <service>.pem/<service>.key for admin, labeling, training, registry, serving and a
# "client" certificate (for the CLI, the SDK and tests), each valid for localhost, 127.0.0.1 and
# gristmill-<name> (the compose service names too). Idempotent: an existing CA and existing certificates are
# kept; only missing ones are made (`gristmill up --tls` runs it into <run dir>/certs). Then set, per service:
#   GRISTMILL_TLS_CERT_FILE=<dir>/<service>.pem GRISTMILL_TLS_KEY_FILE=<dir>/<service>.key GRISTMILL_TLS_CA_FILE=<dir>/ca.pem
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-${GRISTMILL_RUN_DIR:-$ROOT/.run}/certs}"
DAYS="${GRISTMILL_CERT_DAYS:-825}"
command -v openssl >/dev/null || { echo "error: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$OUT"
cd "$OUT"

if [[ ! -s ca.pem || ! -s ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days "$DAYS" \
    -subj "/CN=Gristmill local CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 600 ca.key
fi

for name in admin labeling training registry serving console client; do
  [[ -s "$name.pem" && -s "$name.key" ]] && continue
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=gristmill-$name" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" -days "$DAYS" \
    -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:gristmill-%s,DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$name" "$name") \
    2>/dev/null
  rm -f "$name.csr"
  chmod 600 "$name.key"
done
echo "certificates in $OUT (CA: $OUT/ca.pem)"

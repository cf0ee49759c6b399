#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
#
# A SuperLink with SuperNode authentication lets only registered keys join, and a
# SuperNode whose key is not registered yet exits at once, so this runs before the
# SuperNodes start. A key that is registered already counts as success, so the script can
# run on every start of the deployment.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") [-t SECONDS] ADDRESS CA_CERT PUBLIC_KEY...

Register each PUBLIC_KEY (an OpenSSH public key file such as supernode-0.pub) with the
SuperLink at ADDRESS (HOST:PORT), verifying its TLS certificate with CA_CERT. The node
name is the key file name without .pub. Needs the flwr CLI on PATH.

Options:
  -t SECONDS   how long to wait for the SuperLink to accept connections (default: 60)
  -h, --help   show this help
EOF
}

fail() {
    echo "register-supernodes.sh: $*" >&2
    exit 2
}

timeout_seconds=60
while [ $# -gt 0 ]; do
    case "$1" in
        -t) [ $# -ge 2 ] || fail "-t needs a value"; timeout_seconds="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; fail "unknown option $1" ;;
        *) break ;;
    esac
done
[ $# -ge 3 ] || { usage >&2; fail "expected ADDRESS, CA_CERT and at least one PUBLIC_KEY"; }
[[ "$timeout_seconds" =~ ^[0-9]+$ ]] || fail "-t must be a whole number of seconds, got '$timeout_seconds'"

address="$1"
ca_cert="$2"
shift 2
[ -r "$ca_cert" ] || fail "CA certificate $ca_cert not found or not readable"
ca_cert="$(cd "$(dirname "$ca_cert")" && pwd)/$(basename "$ca_cert")"
for key in "$@"; do
    [ -r "$key" ] || fail "public key $key not found or not readable"
done
command -v flwr >/dev/null || fail "the flwr CLI is not on PATH; install flwr or run this in the otfuse app image"

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# A Flower config file of its own, so the caller's connections stay untouched.
FLWR_HOME="$(mktemp -d)"
export FLWR_HOME
trap 'rm -rf "$FLWR_HOME"' EXIT
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "target"

[superlink.target]
address = "$address"
root-certificates = "$ca_cert"
EOF

deadline=$((SECONDS + timeout_seconds))
for key in "$@"; do
    name="$(basename "$key" .pub)"
    while true; do
        # With --format json, flwr exits 0 also on failure, so the output decides.
        output="$(flwr supernode register "$key" target --name "$name" --format json 2>&1 || true)"
        if grep -q '"success": true' <<<"$output"; then
            echo "registered $name ($key)"
            break
        elif grep -q 'Public key already in use' <<<"$output"; then
            echo "$name was registered already ($key)"
            break
        elif grep -q 'Connection to the SuperLink is unavailable' <<<"$output" \
                && [ "$SECONDS" -lt "$deadline" ]; then
            sleep 2
        else
            echo "$output" >&2
            fail "registering $key with the SuperLink at $address failed"
        fi
    done
done

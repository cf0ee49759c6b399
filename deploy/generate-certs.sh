#!/usr/bin/env bash
# Create the TLS certificates and SuperNode keys of the otfuse deployment.
#
# Writes into one folder:
#   ca.crt, ca.key                  certificate authority (CA) that signs the SuperLink certificate
#   superlink.pem, superlink.key    SuperLink TLS certificate and key, SANs in superlink.ext
#   supernode-<i>, supernode-<i>.pub  SuperNode key pairs (ECDSA P-384, OpenSSH format)
#   superexec-superlink.secret      secret that the ServerApp SuperExec shares with the SuperLink
#   superexec-supernode-<i>.secret  secret that a ClientApp SuperExec shares with SuperNode i
#
# Existing files are kept, so running the script again changes nothing. The SuperLink
# certificate is issued again only when its SAN list changed or the CA was replaced.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEFAULT_DIR="${OTFUSE_CERTS_DIR:-$SCRIPT_DIR/certificates}"
# Host names under which SuperNodes and the flwr CLI reach the SuperLink: the compose
# service name, and the loopback names for the published port and the local SuperExec.
BASE_SANS=("DNS:superlink" "DNS:localhost" "IP:127.0.0.1" "IP:::1")
CURVE="P-384"

usage() {
    cat <<EOF
Usage: $(basename "$0") [options] [DIR]

Create a CA, the SuperLink TLS certificate, SuperNode key pairs and the SuperExec
secrets in DIR (default: \$OTFUSE_CERTS_DIR, else $SCRIPT_DIR/certificates).
Files that exist already are kept; the SuperLink certificate is issued again when
its subject alternative names change.

Options:
  -n, --supernodes N   SuperNode key pairs supernode-0 .. supernode-<N-1> (default: 3)
  -s, --san NAME       add a subject alternative name to the SuperLink certificate,
                       as DNS:<host name> or IP:<address>; repeat for several.
                       Always included: ${BASE_SANS[*]}
  -d, --days N         validity of new certificates in days (default: 365)
  -h, --help           show this help

Needs openssl and ssh-keygen on PATH.
EOF
}

fail() {
    echo "generate-certs.sh: $*" >&2
    exit 2
}

num_supernodes=3
days=365
extra_sans=()
out_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--supernodes) [ $# -ge 2 ] || fail "$1 needs a value"; num_supernodes="$2"; shift 2 ;;
        -s|--san) [ $# -ge 2 ] || fail "$1 needs a value"; extra_sans+=("$2"); shift 2 ;;
        -d|--days) [ $# -ge 2 ] || fail "$1 needs a value"; days="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; fail "unknown option $1" ;;
        *) [ -z "$out_dir" ] || fail "more than one folder given: $out_dir and $1"; out_dir="$1"; shift ;;
    esac
done
out_dir="${out_dir:-$DEFAULT_DIR}"

[[ "$num_supernodes" =~ ^[0-9]+$ ]] || fail "--supernodes must be a whole number, got '$num_supernodes'"
[[ "$days" =~ ^[1-9][0-9]*$ ]] || fail "--days must be a positive whole number, got '$days'"
for san in "${extra_sans[@]+"${extra_sans[@]}"}"; do
    [[ "$san" =~ ^(DNS|IP):[^,[:space:]]+$ ]] \
        || fail "invalid --san '$san': write DNS:<host name> or IP:<address>"
done
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || fail "$tool not found on PATH; install it and run the script again"
done

mkdir -p "$out_dir"
cd "$out_dir"
# Private keys and secrets are created readable by their owner only.
umask 077

if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
    openssl req -x509 -new -newkey ec -pkeyopt "ec_paramgen_curve:$CURVE" -nodes \
        -keyout ca.key -out ca.crt -days "$days" -subj "/CN=otfuse deployment CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f superlink.pem
    echo "created CA: $out_dir/ca.crt"
fi

all_sans=("${BASE_SANS[@]}" "${extra_sans[@]+"${extra_sans[@]}"}")
san_line="$(IFS=,; echo "${all_sans[*]}")"
extensions="basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $san_line"

if [ ! -s superlink.key ]; then
    openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$CURVE" -out superlink.key
    rm -f superlink.pem
fi
if [ ! -s superlink.pem ] || [ "$(cat superlink.ext 2>/dev/null)" != "$extensions" ]; then
    printf '%s\n' "$extensions" > superlink.ext
    openssl req -new -key superlink.key -subj "/CN=superlink" -out superlink.csr
    openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -extfile superlink.ext -out superlink.pem 2>/dev/null
    rm -f superlink.csr
    chmod 644 superlink.pem superlink.ext
    echo "issued SuperLink certificate: $out_dir/superlink.pem ($san_line)"
fi
chmod 644 ca.crt

for ((i = 0; i < num_supernodes; i++)); do
    key="supernode-$i"
    if [ ! -s "$key" ] || [ ! -s "$key.pub" ]; then
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$key" -f "$key"
        echo "created SuperNode key pair: $out_dir/$key(.pub)"
    fi
done

# Flower reads a SuperExec secret file as raw bytes, so no newline is written.
secrets=(superexec-superlink.secret)
for ((i = 0; i < num_supernodes; i++)); do
    secrets+=("superexec-supernode-$i.secret")
done
for secret in "${secrets[@]}"; do
    if [ ! -s "$secret" ]; then
        openssl rand -hex 32 | tr -d '\n' > "$secret"
        echo "created SuperExec secret: $out_dir/$secret"
    fi
done

echo "certificates and keys are in $out_dir"

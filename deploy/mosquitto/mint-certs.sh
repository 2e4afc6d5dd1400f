#!/usr/bin/env bash
# Mints a development PKI for a botfleet broker with openssl (X.509 v3 throughout: rustls
# refuses v1 certificates):
#
#   ca.crt / ca.key                 the fleet CA (keep ca.key offline in production)
#   broker.crt / broker.key         Mosquitto's listener; SAN 127.0.0.1, localhost and --name
#   botfleet-server.crt / .key      the control plane's client certificate (CN botfleet-server)
#   <device>.crt / <device>.key     one client certificate per robot (CN = device id)
#
# Usage: mint-certs.sh OUT_DIR [--name DNS_OR_IP]... [--days N] [DEVICE_ID...]
# An existing CA in OUT_DIR is reused, so devices can be added later.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [--name DNS_OR_IP]... [--days N] [DEVICE_ID...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
names=()
devices=()
days=825
while [ $# -gt 0 ]; do
    case $1 in
        --name) [ $# -ge 2 ] || usage; names+=("$2"); shift 2 ;;
        --days) [ $# -ge 2 ] || usage; days=$2; shift 2 ;;
        -*) usage ;;
        *) devices+=("$1"); shift ;;
    esac
done

mkdir -p "$out"
cd "$out"
umask 077

# Device ids become topic levels and ACL usernames: the same rule as botfleet's DeviceId.
valid_id() { [[ $1 =~ ^[A-Za-z0-9._-]{1,64}$ ]] && [[ $1 != *..* ]] && [ "$1" != . ]; }

if [ ! -f ca.key ] || [ ! -f ca.crt ]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.crt -days "$days" -subj "/CN=botfleet development CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# issue NAME CN EXTENSIONS: a P-256 key and a certificate signed by the CA.
issue() {
    local name=$1 cn=$2 ext=$3
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn" 2>/dev/null
    printf '%s\n' "$ext" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out "$name.crt" -days "$days" -sha256 -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

san="IP:127.0.0.1,DNS:localhost"
for n in "${names[@]}"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san="$san,IP:$n"; else san="$san,DNS:$n"; fi
done
issue broker botfleet-broker "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"

client_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

issue botfleet-server botfleet-server "$client_ext"
for device in "${devices[@]}"; do
    if ! valid_id "$device" || [ "$device" = botfleet-server ]; then
        echo "refusing device id '$device'" >&2
        exit 1
    fi
    issue "$device" "$device" "$client_ext
subjectAltName=DNS:$device"
done

# Mosquitto drops to its own user: certificates are public, keys readable by the owner.
chmod 644 ./*.crt
echo "minted in $out: ca, broker, botfleet-server${devices[*]:+, ${devices[*]}}"

#!/bin/sh
# One-shot certificate maker (the `certs` service of compose.tls.yaml): a private CA and one server
# certificate for the shards, written to $CERT_DIR (default /certs, a volume the shards and workers
# mount read-only). The server certificate names every shard service in CERT_NAMES plus localhost
# (the health check connects to localhost). A client certificate for mutual TLS is made too.
# Nothing is redone when the files exist (FORCE=1 remakes them). The CA key is thrown away: no more
# certificates can be signed with this CA; rerun with FORCE=1 to rotate everything.
set -eu

dir=${CERT_DIR:-/certs}
names=${CERT_NAMES:-shard0,shard1}
days=${CERT_DAYS:-365}

if [ "${FORCE:-0}" != 1 ] && [ -s "$dir/ca.pem" ] && [ -s "$dir/server.pem" ] && [ -s "$dir/server-key.pem" ]; then
    echo "make_certs: certificates already in $dir (FORCE=1 remakes them)"
    exit 0
fi

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

san="DNS:localhost,IP:127.0.0.1"
for n in $(echo "$names" | tr ',' ' '); do san="$san,DNS:$n"; done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$tmp/ca-key.pem"
openssl req -x509 -new -key "$tmp/ca-key.pem" -days "$days" -subj "/CN=optserve compose CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$tmp/ca.pem"

sign() {  # sign NAME CN EXTENSIONS
    key "$tmp/$1-key.pem"
    openssl req -new -key "$tmp/$1-key.pem" -subj "/CN=$2" -out "$tmp/$1.csr"
    printf '%s\n' "$3" > "$tmp/$1.ext"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" -CAcreateserial \
        -days "$days" -extfile "$tmp/$1.ext" -out "$tmp/$1.pem" 2>/dev/null
}
sign server "optserve shard" "subjectAltName=$san
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
sign client "optserve worker" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

mkdir -p "$dir"
for f in ca.pem server.pem server-key.pem client.pem client-key.pem; do cp "$tmp/$f" "$dir/$f"; done
chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
chmod 600 "$dir/server-key.pem" "$dir/client-key.pem"
echo "make_certs: CA, server certificate ($san) and client certificate written to $dir"

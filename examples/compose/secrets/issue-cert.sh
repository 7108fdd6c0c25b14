#!/bin/sh
# Issue the server certificate for the secrets example from a throwaway CA,
# the way any external CA would hand over files: certs/tls.crt (the chain)
# and certs/tls.key. The CA (certs/ca.pem, certs/ca.key) is created on the
# first run and kept, so running the script again is a rotation that
# clients trusting certs/ca.pem do not notice.
#
# Compose mounts each secret file by itself, so a file replaced by a rename
# would stay invisible in the running container. The new key and chain are
# therefore written into the existing files, in place; sheath re-reads them
# within its 10s poll interval, refuses the mismatched pair it may see
# between the two writes, and swaps in the new one for new connections.
#
# Needs OpenSSL 3.0 or newer.
set -eu

cd "$(dirname "$0")"
mkdir -p certs
umask 077

if [ ! -f certs/ca.pem ]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -days 365 -subj "/CN=sheath secrets example CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout certs/ca.key -out certs/ca.pem
    chmod 0644 certs/ca.pem
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The names match what the README's curl command uses.
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -CA certs/ca.pem -CAkey certs/ca.key -days 30 \
    -subj "/CN=app.example.test" \
    -addext "subjectAltName=DNS:app.example.test,DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$tmp/tls.key" -out "$tmp/tls.crt"

# `cat >` keeps the files' inodes (and, for a new file, umask 077 keeps the
# key private).
cat "$tmp/tls.key" > certs/tls.key
cat "$tmp/tls.crt" > certs/tls.crt
chmod 0644 certs/tls.crt
openssl x509 -in certs/tls.crt -noout -subject -enddate -fingerprint -sha256

#!/bin/sh
# A CA and a server certificate for a first install of fleetrun (docs/security.md, TLS):
#   build/make-tls-certs.sh DIR DNS_NAME IP_ADDRESS
# writes DIR/ca.pem (give it to agents and the CLI: ca_file, --ca-file), DIR/ca.key (keep
# it offline: it signs certificates), DIR/server.pem and DIR/server.key (the control
# plane's tls_cert and tls_key), valid for https://DNS_NAME:8470 and https://IP_ADDRESS:8470.
set -eu
[ $# -eq 3 ] || { echo "usage: $0 DIR DNS_NAME IP_ADDRESS" >&2; exit 2; }
DIR=$1 DNS=$2 IP=$3
mkdir -p "$DIR" && cd "$DIR"
umask 077
# recipe start
# 1. The CA: a key, and a certificate it signs itself, valid for 10 years.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=fleetrun CA" -keyout ca.key -out ca.csr
printf '%s\n' "basicConstraints = critical, CA:true" \
    "keyUsage = critical, keyCertSign, cRLSign" \
    "subjectKeyIdentifier = hash" > ca.ext
openssl x509 -req -in ca.csr -signkey ca.key -days 3650 -sha256 -extfile ca.ext -out ca.pem
# 2. The server: a key, and a certificate the CA signs for its DNS name and IP address.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$DNS" -keyout server.key -out server.csr
printf '%s\n' "subjectAltName = DNS:$DNS, IP:$IP" \
    "basicConstraints = critical, CA:false" \
    "keyUsage = critical, digitalSignature" \
    "extendedKeyUsage = serverAuth" \
    "subjectKeyIdentifier = hash" \
    "authorityKeyIdentifier = keyid" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -sha256 -extfile server.ext -out server.pem
# recipe end
chmod 0644 ca.pem server.pem
rm -f ca.csr ca.ext server.csr server.ext ca.srl

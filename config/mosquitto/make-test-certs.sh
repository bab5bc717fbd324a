#!/bin/sh
# Make a throw-away CA, a broker (server) certificate and a kiosk (client) certificate for TESTING
# TLS between kioskd and mosquitto. For production, use your site's CA.
#
# usage: make-test-certs.sh [-d DIR] [-s SAN]... [-c CLIENT_CN] [-e]
#   -d DIR        where to write the files (default: ./certs); must not hold a ca.key yet
#   -s SAN        a subjectAltName of the broker, e.g. -s DNS:broker.lan -s IP:10.0.0.5;
#                 repeatable; kioskd checks it against mqtt.host
#                 (default: DNS:localhost and IP:127.0.0.1)
#   -c CLIENT_CN  common name of the client certificate (default: kiosk)
#   -e            also make server-expired.crt/.key: same names, but valid only on 2020-01-01,
#                 to check that clients refuse an expired broker certificate
#
# Writes ca.crt ca.key server.crt server.key client.crt client.key (keys mode 600). The broker
# needs ca.crt (only with require_certificate), server.crt and server.key; each kiosk needs
# ca.crt (mqtt.tls.ca_file) and, if the broker asks for one, client.crt and client.key.
set -eu

dir=./certs
sans=
client_cn=kiosk
expired=false
days=365

usage() {
    sed -n '5,13s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while getopts 'd:s:c:eh' option; do
    case "$option" in
        d) dir=$OPTARG ;;
        s) sans="${sans:+$sans,}$OPTARG" ;;
        c) client_cn=$OPTARG ;;
        e) expired=true ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ "$#" -eq 0 ] || usage
sans=${sans:-DNS:localhost,IP:127.0.0.1}
# The first name doubles as the common name (clients only look at the subjectAltName).
server_cn=${sans%%,*}
server_cn=${server_cn#*:}

mkdir -p "$dir"
cd "$dir"
if [ -e ca.key ]; then
    echo "make-test-certs: $dir/ca.key exists; refusing to replace a CA" >&2
    exit 1
fi
umask 077

new_key() {
    # P-256: small and fast on a Raspberry Pi; supported by mosquitto and Python's ssl.
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# 1. The CA: self-signed, may sign certificates but nothing else.
new_key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=kioskd test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt

# 2. Extensions for the certificates the CA signs.
cat >server.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EOF
cat >client.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EOF

sign() { # name common-name
    new_key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -extfile "$1.ext" -out "$1.crt" 2>/dev/null
}

# 3. The broker's certificate, and a client certificate for brokers that require one.
sign server "$server_cn"
sign client "$client_cn"

# 4. Optionally an expired broker certificate. `openssl x509 -req` always starts "now", so this
#    one goes through `openssl ca`, which takes explicit dates.
if [ "$expired" = true ]; then
    new_key server-expired.key
    openssl req -new -key server-expired.key -subj "/CN=$server_cn" -out server-expired.csr
    : >index.txt
    cat >ca.cnf <<EOF
[ca]
default_ca = test_ca
[test_ca]
database = index.txt
new_certs_dir = .
certificate = ca.crt
private_key = ca.key
serial = ca.srl
default_md = sha256
policy = any
copy_extensions = none
[any]
commonName = supplied
EOF
    openssl ca -batch -config ca.cnf -notext -extfile server.ext \
        -startdate 20200101000000Z -enddate 20200102000000Z \
        -in server-expired.csr -out server-expired.crt 2>/dev/null
    rm -f index.txt* ca.cnf ca.srl.old ./*.pem
fi

rm -f ./*.csr ./*.ext
# Certificates are public; keys stay private to their owner.
chmod 644 ./*.crt
echo "made a test CA, server certificate ($sans) and client certificate in $dir"

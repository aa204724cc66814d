#!/bin/sh
# Render Redis's ACL file from the template and the two password files of Zumik's secrets:
#   sh render-users-acl.sh SECRETS_DIR TEMPLATE OUT
# The file holds SHA-256 hashes of the passwords, never the passwords; it is written 0600.
# A password is its file's text without the final newline (as Zumik reads it).
set -eu
secrets=$1 template=$2 out=$3
umask 077
digest() { tr -d '\r\n' < "$1" | sha256sum | cut -c1-64; }
gateway=$(digest "$secrets/redis-gateway.password")
kv=$(digest "$secrets/redis-kv.password")
sed -e "s/GATEWAY_PASSWORD_SHA256/$gateway/" -e "s/KV_PASSWORD_SHA256/$kv/" "$template" > "$out.tmp"
mv "$out.tmp" "$out"

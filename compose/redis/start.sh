#!/bin/sh
# Starts redis-server with Conduit's Redis users (users.acl beside this script, written by
# `conduit redis-acl`), each user's password read from the environment variable its placeholder
# names (REDIS_GATEWAY_PASSWORD, ...). redis-server reads the users on its standard input: only the
# passwords' SHA-256 digests reach it, never a command line (`ps`) nor a file. Arguments are more
# redis-server options (--appendonly yes ...). Without a password (or with one under 16 characters)
# for every user, Redis does not start; nor with one holding a newline (a secret made from a file
# often ends in one, which clients would send and a plain $(...) would strip: no login would work).
set -eu
acl=${CONDUIT_REDIS_USERS:-$(dirname "$0")/users.acl}
users=$(grep '^user ' "$acl")
newline='
'
for name in $(printf '%s\n' "$users" | grep -o '#{[A-Z0-9_]*}' | tr -d '#{}' | sort -u); do
    # Every character kept: the x shields trailing newlines from $(...); then printenv's own newline goes.
    value=$(printenv "$name" || true; echo x)
    value=${value%x}
    value=${value%"$newline"}
    case $value in
        *"$newline"*)
            echo "redis: $name contains a newline (a secret file's trailing one?): remove it; clients" \
                 "send the password as it is, so none could log in" >&2
            exit 1 ;;
    esac
    if [ "${#value}" -lt 16 ]; then
        problem="not set"
        [ -z "$value" ] || problem="shorter than 16 characters"
        echo "redis: $name is $problem: give it a long random password (openssl rand -hex 32)," \
             "in compose/.env or the Secret" >&2
        exit 1
    fi
    digest=$(printf '%s' "$value" | sha256sum | cut -d ' ' -f 1)
    users=$(printf '%s\n' "$users" | sed "s/#{$name}/#$digest/")
done
exec redis-server "$@" - <<USERS
$users
USERS

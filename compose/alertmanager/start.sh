#!/bin/sh
# Alertmanager's start (compose/docker-compose.yml): the shipped alertmanager.yml with the
# webhook URL from ALERTMANAGER_WEBHOOK_URL in place of its placeholder, written to a tmpfs
# readable only by Alertmanager's user (a Slack or PagerDuty URL is a secret), then Alertmanager.
set -eu
src=/etc/alertmanager/alertmanager.yml
out=/tmp/alertmanager.yml
placeholder='http://alert-webhook.invalid/set-ALERTMANAGER_WEBHOOK_URL'
url=${ALERTMANAGER_WEBHOOK_URL:-}
umask 077
if [ -z "$url" ]; then
    echo "alertmanager: ALERTMANAGER_WEBHOOK_URL is not set: alerts are not delivered (compose/README.md, Alerts)" >&2
    cp "$src" "$out"
else
    case "$url" in
        http://*|https://*) ;;
        *) echo "alertmanager: ALERTMANAGER_WEBHOOK_URL must be an http(s) URL" >&2; exit 1 ;;
    esac
    case "$url" in
        *"'"*|*'"'*|*' '*) echo "alertmanager: ALERTMANAGER_WEBHOOK_URL must not hold quotes or spaces" >&2; exit 1 ;;
    esac
    # sed's replacement treats \ & and the delimiter specially: escape them.
    escaped=$(printf '%s' "$url" | sed 's/[\\&|]/\\&/g')
    sed "s|$placeholder|$escaped|" "$src" > "$out"
fi
exec /bin/alertmanager "$@"

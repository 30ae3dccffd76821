#!/bin/sh
# Entrypoint of the services other than admin in docker-compose.yml (run as `sh service-key.sh CMD...`).
#
# The admin service writes the root organisation's first admin key to <its data dir>/root-admin.key on its
# first start (before it reports healthy). `gristmill up` gives that key to the other services as their own
# (GRISTMILL_AUTH_SERVICE_KEY): they send it on calls to other services (serving -> registry) and read plans
# and usage for quotas with it. Here the admin's volume is mounted read-only into each service, and this
# script reads the key from GRISTMILL_AUTH_SERVICE_KEY_FILE into GRISTMILL_AUTH_SERVICE_KEY, unless that is
# already set (a key given in the environment wins), then runs the service.
set -eu

if [ -z "${GRISTMILL_AUTH_SERVICE_KEY:-}" ]; then
  unset GRISTMILL_AUTH_SERVICE_KEY
  key_file="${GRISTMILL_AUTH_SERVICE_KEY_FILE:-}"
  if [ -n "$key_file" ] && [ -r "$key_file" ]; then
    GRISTMILL_AUTH_SERVICE_KEY="$(cat "$key_file")"
    export GRISTMILL_AUTH_SERVICE_KEY
  elif [ -n "$key_file" ]; then
    echo "service-key.sh: warning: no readable key at $key_file and GRISTMILL_AUTH_SERVICE_KEY is empty:" \
      "starting without a service key (no quotas, calls to other services unauthenticated)" >&2
  fi
fi
exec "$@"

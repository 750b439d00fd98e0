#!/bin/sh
# Stops or starts the harness Postgres of this test run (tests/support/harness.sh exports where it
# lives), for tests of what a service does while its database is down.
#   sh tests/support/pg_stop_start.sh stop|start
set -eu
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "${1:?stop|start}" in
stop) as_pg "$IOT_TEST_PG_CTL" -D "$IOT_TEST_PG_DATA" -m fast -w stop >/dev/null ;;
start) as_pg "$IOT_TEST_PG_CTL" -D "$IOT_TEST_PG_DATA" -l "$IOT_TEST_PG_DATA/../server.log" -w -t 60 -o "$IOT_TEST_PG_OPTS" start >/dev/null ;;
*) echo "usage: $0 stop|start" >&2; exit 2 ;;
esac

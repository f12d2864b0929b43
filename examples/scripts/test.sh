#!/usr/bin/env bash
# The whole test suite, services included: installs what the tests start
# as real child processes when it is missing (Debian's redis-server for the
# cluster tests, chromium and chromedriver for the web client's browser
# test), then runs `cargo test --workspace` (extra arguments are passed on).
# The tests never skip a missing service: they fail and name the package.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} (the tests start them)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
exec cargo test --workspace "$@"

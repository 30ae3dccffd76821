#!/usr/bin/env bash
# The headless browser of the console's browser tests: Debian's chromium and chromium-driver (never a browser
# downloaded by a test tool).
#
#   deploy/local/browser.sh provision   install them (as root, with apt-get) unless present; prints their paths
#
# GRISTMILL_CHROMIUM / GRISTMILL_CHROMEDRIVER name other binaries (the tests read the same variables).
set -euo pipefail

COMPONENT=browser
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PROVISION_LOG="$GRISTMILL_LOG_DIR/browser-provision.log"
CHROMIUM="${GRISTMILL_CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${GRISTMILL_CHROMEDRIVER:-/usr/bin/chromedriver}"

present() { [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; }

cmd_provision() {
  if present; then
    say "$CHROMIUM and $CHROMEDRIVER present"
    return 0
  fi
  ((EUID == 0)) ||
    die "$CHROMIUM or $CHROMEDRIVER is missing; install them (as root: apt-get install -y chromium chromium-driver) or set GRISTMILL_CHROMIUM and GRISTMILL_CHROMEDRIVER"
  need_cmd apt-get "install chromium and its driver and set GRISTMILL_CHROMIUM and GRISTMILL_CHROMEDRIVER"
  mkdir -p "$GRISTMILL_LOG_DIR"
  say "installing Debian's chromium and chromium-driver; log: $PROVISION_LOG"
  local start=$SECONDS
  apt_install "$PROVISION_LOG" chromium chromium-driver
  present || die "chromium is installed but $CHROMIUM or $CHROMEDRIVER is missing"
  say "provisioned chromium in $((SECONDS - start)) s"
}

case "${1:-}" in
  provision) cmd_provision ;;
  *) die "usage: $0 provision" ;;
esac

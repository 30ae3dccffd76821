#!/usr/bin/env bash
# Copies the console's vendored front-end libraries into the package from their npm packages, each checked against
# the sha256 below: htmx (the pages' forms and fragments) and Chart.js (the charts). Run by hand to change a version
# (then update its version and sha256 together); the copies are committed, so installing or running the console
# never fetches anything.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
static=$here/gristmill/console/static
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# vendor PACKAGE VERSION SHA256 FILE_IN_PACKAGE DEST_NAME LICENSE_NAME
vendor() {
  local package=$1 version=$2 sha=$3 file=$4 dest=$5 license=$6
  mkdir -p "$work/$package"
  (cd "$work/$package" && npm pack --silent "$package@$version" >/dev/null && tar xzf ./*.tgz)
  echo "$sha  $work/$package/package/$file" | sha256sum --check --quiet -
  cp "$work/$package/package/$file" "$static/$dest"
  cp "$work/$package/package/$license" "$static/${dest%%.*}.LICENSE"
  echo "$package $version -> $static/$dest"
}

vendor htmx.org 2.0.8 22283ef68cb7545914f0a88a1bdedc7256a703d1d580c1d255217d0a50d31313 \
  dist/htmx.min.js htmx.min.js LICENSE
vendor chart.js 4.6.1 87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2 dist/chart.umd.min.js chart.umd.min.js LICENSE.md

#!/usr/bin/env bash
# Copies the console's vendored front-end library into the package: htmx, from its npm package, checked against
# the sha256 below. Run by hand to change the version (then update VERSION and SHA256 together); the copy is
# committed, so installing or running the console never fetches anything.
set -euo pipefail
VERSION=2.0.8
SHA256=22283ef68cb7545914f0a88a1bdedc7256a703d1d580c1d255217d0a50d31313
here=$(cd "$(dirname "$0")" && pwd)
dest=$here/gristmill/console/static/htmx.min.js
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "htmx.org@$VERSION" >/dev/null && tar xzf "htmx.org-$VERSION.tgz")
echo "$SHA256  $work/package/dist/htmx.min.js" | sha256sum --check --quiet -
cp "$work/package/dist/htmx.min.js" "$dest"
cp "$work/package/LICENSE" "$here/gristmill/console/static/htmx.LICENSE"
echo "htmx $VERSION -> $dest"

#!/usr/bin/env bash
# The browser test drives Debian's chromium with Playwright (`npx playwright install` cannot download
# browsers offline). Install it when we can (root with apt); otherwise the browser test skips and says why.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test (about 20 s)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
else
  echo "note: chromium not found and not root; the browser test will be skipped"
fi
exit 0

#!/usr/bin/env bash
# Installs Debian's chromium (used by the report test) when it is missing. Needs root/apt.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report test (apt-get)..."
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null &&
    exit 0
  echo "warning: could not install chromium; the browser test will fail" >&2
  exit 0
fi
echo "warning: chromium missing and not root: install Debian's chromium package" >&2
exit 0

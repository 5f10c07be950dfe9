#!/usr/bin/env bash
# Installs the Debian packages the local stack and the tests need, when they
# are missing and we may (root with apt-get). The Google Cloud CLI and its
# emulator components do not come from Debian's archive: if absent, the
# check in `python -m devstack --check` says how to get them. npm (Node.js)
# installs the chat UI's libraries (`make ui`).
set -euo pipefail

need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The browser tests (tests/browser/) drive Debian's Chromium through Playwright.
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing system packages: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
echo "Installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"

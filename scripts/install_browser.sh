#!/usr/bin/env bash
# What the browser front end's tests need on a Debian/Ubuntu machine: Chromium (driven by Playwright with
# executable_path, no browser download) and Mesa's EGL for offscreen VTK rendering. Needs root and apt-get;
# does nothing when everything is already there.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
for package in libegl1 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }

#!/usr/bin/env bash
# Install the systemd unit and the keepalived notify script shipped in the
# package (src/pyhast/data), pointing them at this checkout's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=$(pwd)/.venv
data=src/pyhast/data
install -d /usr/local/libexec/hast
install -m 0755 "$data/hast-keepalived-notify" /usr/local/libexec/hast/hast-keepalived-notify
ln -sf "$venv/bin/hastd" /usr/local/sbin/hastd
ln -sf "$venv/bin/hastctl" /usr/local/sbin/hastctl
sed -e "s|@HASTD@|$venv/bin/hastd|" -e "s|@HASTCTL@|$venv/bin/hastctl|" \
    -e "s|@DOCDIR@|$(pwd)|" "$data/hastd.service" > /etc/systemd/system/hastd.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "Installed /etc/systemd/system/hastd.service and /usr/local/libexec/hast/hast-keepalived-notify."

#!/usr/bin/env bash
# Removes what install.sh added: the unit (stopped and disabled first), the polkit rule, the
# user and its group, and the code under /opt/mgpumanager. The registry under
# /etc/mgpumanager stays (then root's alone): deploying again picks it up. Safe to run again.
#
# ROOT= puts every path under another directory (the tests uninstall from a scratch one).
set -euo pipefail

ROOT=${ROOT:-}
NAME=mgpumanager
APP=$ROOT/opt/$NAME
ETC=$ROOT/etc/$NAME
RULE=$ROOT/etc/polkit-1/rules.d/50-$NAME.rules
UNIT=$ROOT/etc/systemd/system/$NAME.service

say() { echo "$NAME undeploy: $*"; }

if [ -e "$UNIT" ]; then
  systemctl disable --now --quiet "$NAME.service"
  rm -f "$UNIT"
  systemctl daemon-reload
  say "stopped and removed $NAME.service"
fi
if [ -e "$RULE" ]; then
  rm -f "$RULE"
  say "removed the polkit rule"
fi
if [ -d "$ETC" ]; then
  chgrp -R root "$ETC"  # its group is about to go
fi
if id -u "$NAME" >/dev/null 2>&1; then
  userdel "$NAME"
  say "removed user $NAME"
fi
if getent group "$NAME" >/dev/null; then
  groupdel "$NAME"
fi
if [ -d "$APP" ]; then
  rm -rf "$APP"
  say "removed $APP"
fi
if [ -e "$ETC/consumers.yaml" ]; then
  say "kept the registry: $ETC/consumers.yaml"
fi

#!/usr/bin/env bash
# Installs mgpumanager on this box, as root, from the tree `make deploy` put in /opt/mgpumanager
# (with its .venv built). Safe to run again: it creates what is missing, rewrites what it owns
# (the unit, the polkit rule), and never overwrites the registry.
#
#   user      mgpumanager (system user and group, no home, no shell)
#   registry  /etc/mgpumanager/consumers.yaml  root:mgpumanager 0640 (it may hold auth.token);
#             installed from config/consumers.yaml only when absent
#   rule      /etc/polkit-1/rules.d/50-mgpumanager.rules, generated from the registry: the
#             user may start/stop exactly the units its `command` consumers name
#   unit      /etc/systemd/system/mgpumanager.service, enabled and restarted
#
# ROOT= puts every path under another directory (the tests install into a scratch one).
set -euo pipefail

ROOT=${ROOT:-}
NAME=mgpumanager
APP=$ROOT/opt/$NAME
BIN=$APP/.venv/bin/$NAME
ETC=$ROOT/etc/$NAME
REGISTRY=$ETC/consumers.yaml
RULES_DIR=$ROOT/etc/polkit-1/rules.d
RULE=$RULES_DIR/50-$NAME.rules
UNIT=$ROOT/etc/systemd/system/$NAME.service

say() { echo "$NAME deploy: $*"; }

# -- the user ----------------------------------------------------------------------------------
if ! id -u "$NAME" >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "mgpumanager GPU broker" "$NAME"
  say "created system user $NAME"
fi
# The NVIDIA device nodes are world read-write unless the driver was told otherwise
# (NVreg_DeviceFileMode/NVreg_DeviceFileGID); then the user joins the group that owns them.
if [ -c "$ROOT/dev/nvidiactl" ]; then
  mode=$(stat -c %a "$ROOT/dev/nvidiactl")
  group=$(stat -c %G "$ROOT/dev/nvidiactl")
  if [ $((8#$mode & 6)) -ne 6 ] && ! id -nG "$NAME" | tr ' ' '\n' | grep -qx "$group"; then
    usermod --append --groups "$group" "$NAME"
    say "added $NAME to group $group (owner of /dev/nvidiactl, mode $mode)"
  fi
fi

# -- the code: readable by the user, writable only by whoever deployed it ----------------------
chmod -R a+rX "$APP"
# The unit's file system is read-only: compile now, or every start compiles in memory.
"$APP/.venv/bin/python" -m compileall -q "$APP/src" >/dev/null

# -- the registry ------------------------------------------------------------------------------
install -d -m 0750 "$ETC"
chown "root:$NAME" "$ETC"
if [ ! -e "$REGISTRY" ]; then
  install -m 0640 "$APP/config/consumers.yaml" "$REGISTRY"
  say "installed the example registry at $REGISTRY: edit it, then run make deploy again"
fi
chown "root:$NAME" "$REGISTRY"
chmod 0640 "$REGISTRY"
"$BIN" check-config "$REGISTRY"

# -- the polkit rule ---------------------------------------------------------------------------
if [ -d "$RULES_DIR" ]; then
  "$BIN" deploy-rules --config "$REGISTRY" --user "$NAME" >"$RULE.new"
  chmod 0644 "$RULE.new"
  mv -f "$RULE.new" "$RULE"  # polkitd picks up the change by itself
else
  say "WARNING: no $RULES_DIR (polkit missing, or older than 0.106): the systemctl calls" \
    "of command consumers will be refused"
fi

# -- the unit ----------------------------------------------------------------------------------
install -m 0644 "$APP/deploy/$NAME.service" "$UNIT"
systemctl daemon-reload
systemctl enable --quiet "$NAME.service"
systemctl restart "$NAME.service"
say "running as $NAME; check its rights with: systemd-analyze security $NAME"

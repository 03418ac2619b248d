#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it on this machine, as root, with or
# without systemd running as PID 1 (CI has none): install, the binary, the packaged config,
# the voicetagd user, the unit (systemd-analyze verify and security), a short run of the
# installed daemon as that user on the installed config, a reinstall (the upgrade path), and
# a purge that leaves the machine as it was. Called by .ci/run; run it by hand the same way:
#   sudo packaging/check-deb.sh
# It purges an installed voicetagd package first: run it on a build or CI machine only.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
# systemd-analyze security's scale is 0..100 for exposure 0.0..10.0: 15 = "1.5 or lower".
MAX_EXPOSURE=15
UNIT=/lib/systemd/system/voicetagd.service
CONF=/etc/voicetagd/voicetagd.toml
PORT=7878

fail() { echo "check-deb: FAIL: $*" >&2; exit 1; }
step() { echo "-- $*"; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"

step "cargo-deb $CARGO_DEB_VERSION"
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
cargo deb --version

step "cargo deb"
deb=$(cargo deb | tail -n 1)
[ -f "$deb" ] || fail "cargo deb did not produce a .deb ($deb)"
echo "$deb"
dpkg-deb --info "$deb"
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/voicetagd ./etc/voicetagd/voicetagd.toml \
    ./usr/lib/systemd/system/voicetagd.service ./usr/share/doc/voicetagd/OPERATIONS.md; do
    grep -q " $f\$" <<<"$contents" || fail "$f is not in the package"
done
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = "$CONF" ] \
    || fail "$CONF is not the package's only conffile"

# A clean slate: a voicetagd left installed by an interrupted run is purged; the voicetagd
# user is removed at the end only if this run created it.
if dpkg-query -W -f='${Status}' voicetagd 2>/dev/null | grep -q "installed"; then
    step "purging a voicetagd package left installed"
    dpkg --purge voicetagd
fi
user_existed=no
getent passwd voicetagd >/dev/null && user_existed=yes
daemon_pid=
log=$(mktemp)
cleanup() {
    if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; fi
    rm -f "$log"
    if dpkg-query -W -f='${Status}' voicetagd 2>/dev/null | grep -q "installed"; then
        dpkg --purge voicetagd >/dev/null || true
    fi
    if [ "$user_existed" = no ] && getent passwd voicetagd >/dev/null; then
        userdel voicetagd 2>/dev/null || true
        groupdel voicetagd 2>/dev/null || true
    fi
}
trap cleanup EXIT

step "dpkg -i"
dpkg -i "$deb"

step "binary"
version=$(/usr/bin/voicetagd --version)
echo "$version"
want=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ "$version" = "voicetagd $want" ] || fail "--version says '$version', Cargo.toml says $want"

step "system user"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd voicetagd) || fail "no voicetagd user"
getent group voicetagd >/dev/null || fail "no voicetagd group"
[ "$uid" -lt 1000 ] || fail "voicetagd is not a system user (uid $uid)"
[ "$gid" = "$(getent group voicetagd | cut -d: -f3)" ] || fail "voicetagd's primary group"
[ "$home" = /var/lib/voicetagd ] || fail "voicetagd's home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "voicetagd's shell is $shell"
[ "$(stat -c '%U:%G %a' /var/lib/voicetagd)" = "voicetagd:voicetagd 750" ] \
    || fail "/var/lib/voicetagd is $(stat -c '%U:%G %a' /var/lib/voicetagd)"
echo "voicetagd uid=$uid gid=$gid home=$home shell=$shell"

step "packaged config (as root, and as the service user)"
voicetagd check-config --config "$CONF"
setpriv --reuid=voicetagd --regid=voicetagd --init-groups voicetagd check-config --config "$CONF"

step "unit"
[ -f "$UNIT" ] || fail "$UNIT is not installed"
cmp "$UNIT" systemd/voicetagd.service || fail "installed unit differs from systemd/voicetagd.service"
[ -L /etc/systemd/system/multi-user.target.wants/voicetagd.service ] \
    || fail "the unit is not enabled (no multi-user.target.wants link)"
# verify loads the unit as PID 1 would, checks every directive and that each Exec*= binary
# exists; it works without systemd running. Clean means no output at all.
verify=$(systemd-analyze verify "$UNIT" 2>&1) || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify is not clean: $verify"
echo "systemd-analyze verify: clean"
security=$(systemd-analyze security --offline=true --threshold="$MAX_EXPOSURE" "$UNIT" 2>&1) \
    || { echo "$security"; fail "exposure above $MAX_EXPOSURE/100"; }
grep -E '^✗' <<<"$security" || true
grep -F 'Overall exposure level' <<<"$security" || fail "no exposure level in: $security"

step "run the installed daemon as voicetagd on the packaged config"
if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then
    echo "port $PORT is busy here: skipping the run"
else
    VOICETAGD_LOG=info setpriv --reuid=voicetagd --regid=voicetagd --init-groups \
        voicetagd run --config "$CONF" >"$log" 2>&1 &
    daemon_pid=$!
    python3 - "$PORT" <<'EOF' || { cat "$log"; fail "packaged daemon run"; }
import glob, json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=2) as r:
            return r.status
    except Exception:
        return None
deadline = time.time() + 30
while get("/readyz") != 200:
    if time.time() > deadline:
        sys.exit("not ready within 30s")
    time.sleep(0.2)
body = json.dumps({"sessionId": "check-deb", "audioMinutes": 1.0, "provider": "p", "model": "m"}).encode()
req = urllib.request.Request(base + "/api/v1/voice/stt", data=body, headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=5) as r:
    assert r.status == 200, r.status
deadline = time.time() + 30
while True:
    files = glob.glob("/var/lib/voicetagd/outbox/*.ndjson")
    if files and any("check-deb" in open(f).read() for f in files):
        break
    if time.time() > deadline:
        sys.exit("event not delivered to /var/lib/voicetagd/outbox within 30s")
    time.sleep(0.2)
print("ready, accepted an event, delivered it to", files[0])
EOF
    kill -TERM "$daemon_pid"
    rc=0
    wait "$daemon_pid" || rc=$?
    daemon_pid=
    [ "$rc" = 0 ] || { cat "$log"; fail "SIGTERM exit status $rc"; }
    echo "SIGTERM: exit 0"
    [ -z "$(find /var/lib/voicetagd ! -user voicetagd)" ] \
        || fail "files under /var/lib/voicetagd not owned by voicetagd"
fi

step "reinstall (the upgrade path) keeps a changed conffile"
echo "# changed by check-deb" >>"$CONF"
dpkg -i "$deb"
tail -n 1 "$CONF" | grep -q "changed by check-deb" || fail "reinstall replaced the changed $CONF"

step "dpkg --purge"
dpkg --purge voicetagd
for p in /usr/bin/voicetagd "$UNIT" /etc/voicetagd /var/lib/voicetagd \
    /etc/systemd/system/multi-user.target.wants/voicetagd.service; do
    [ ! -e "$p" ] || fail "$p is left after purge"
done
echo "check-deb: ok ($(grep -F 'Overall exposure level' <<<"$security" | sed 's/^→ //'))"

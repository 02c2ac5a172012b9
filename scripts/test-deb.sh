#!/usr/bin/env bash
# Builds the amd64 package, shows it, runs lintian, installs it with
# dpkg -i, checks what it installed, purges it and checks that it is gone.
# Run as root on a Debian 12 machine (CI: a fresh one). Bounded in time
# (TEST_DEB_TIMEOUT seconds, default 1500) and cleans up after itself.
#
# The package conflicts with every other mail-transport-agent, as Debian's
# MTAs do. If one is installed (exim4, postfix, nullmailer...), dpkg -i
# refuses the package ("conflicting packages - not installing postling");
# the script checks that it does, then runs the install test in a
# throwaway Debian 12 chroot (debootstrap --variant=minbase) instead of
# removing or forcing anything on this machine; there it also installs once
# more with adduser hidden, to test postinst's useradd path.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${TEST_DEB_UNDER_TIMEOUT:-}" ]; then
  export TEST_DEB_UNDER_TIMEOUT=1
  exec timeout --kill-after=30 "${TEST_DEB_TIMEOUT:-1500}" "$0" "$@"
fi
if [ "$(id -u)" != 0 ]; then
  echo "test-deb: run as root (dpkg -i)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "test-deb: FAIL: $*" >&2
  exit 1
}
ok() { echo "ok: $*"; }

step "build"
scripts/build-deb.sh amd64
pkgid=$(cargo pkgid --offline 2>/dev/null || cargo pkgid)
version=${pkgid##*[#@]}
deb=$(realpath "target/deb/postling_${version}_amd64.deb")

step "dpkg-deb --info"
dpkg-deb --info "$deb"
step "dpkg-deb --contents"
dpkg-deb --contents "$deb"

step "lintian"
if ! command -v lintian >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq lintian >/dev/null
fi
# Warnings are shown, not fatal; an error tag (not overridden) fails.
lintian --fail-on error "$deb" || fail "lintian reported errors"

# Where to install: this machine, or a chroot if an MTA is in the way.
root=""
created_user=0
cleanup() {
  set +e
  if [ -n "$root" ]; then
    for m in proc dev/pts dev; do
      mountpoint -q "$root/$m" && umount -l "$root/$m"
    done
    rm -rf "$root"
  else
    if dpkg-query -W -f='${Status}' postling 2>/dev/null | grep -q 'ok installed\|config-files'; then
      dpkg --purge postling >/dev/null 2>&1
    fi
    if [ "$created_user" = 1 ]; then
      userdel postling 2>/dev/null
      groupdel postling 2>/dev/null
    fi
  fi
}
trap cleanup EXIT

mtas=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Provides}\n' 2>/dev/null |
  awk '$1 ~ /^.i/ && /mail-transport-agent/ && $2 != "postling" { print $2 }' | paste -sd ' ')
if [ -n "$mtas" ]; then
  step "an MTA is installed here ($mtas): dpkg -i must refuse"
  if out=$(dpkg -i "$deb" 2>&1); then
    echo "$out"
    fail "dpkg -i installed postling next to $mtas"
  fi
  echo "$out"
  grep -q 'conflicting packages - not installing postling' <<<"$out" || fail "unexpected dpkg error"
  ok "dpkg refuses to install postling next to $mtas (apt would remove $mtas)"

  step "install test in a throwaway Debian 12 chroot (debootstrap --variant=minbase)"
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  }
  root=$(mktemp -d /tmp/postling-deb-test.XXXXXX)
  debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    >"$root.debootstrap.log" 2>&1 || {
    tail -20 "$root.debootstrap.log"
    rm -f "$root.debootstrap.log"
    fail "debootstrap"
  }
  rm -f "$root.debootstrap.log"
  mount -t proc proc "$root/proc"
  cp "$deb" "$root/tmp/"
  run() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
  pkg=/tmp/$(basename "$deb")
else
  run() { "$@"; }
  pkg=$deb
  getent passwd postling >/dev/null || created_user=1
fi

step "dpkg -i"
run dpkg -i "$pkg"
run dpkg -s postling | grep -q '^Status: install ok installed' || fail "not installed"
ok "installed"

step "checks"
got=$(run postling --version)
[ "$got" = "postling $version" ] || fail "postling --version: $got"
ok "postling --version: $got"
[ "$(run readlink /usr/sbin/sendmail)" = postling ] || fail "/usr/sbin/sendmail link"
[ "$(run readlink -f /usr/lib/sendmail)" = /usr/sbin/postling ] || fail "/usr/lib/sendmail link"
[ "$(run readlink -f /usr/bin/mailq)" = /usr/sbin/postling ] || fail "/usr/bin/mailq link"
ok "sendmail, /usr/lib/sendmail and mailq link to /usr/sbin/postling"
# argv[0] dispatch: mailq's own usage; sendmail without a running daemon
# exits 75 (EX_TEMPFAIL) and says why.
out=$(run mailq --help) || fail "mailq --help"
grep -q '^Usage: mailq' <<<"$out" || fail "mailq --help: $out"
rc=0
out=$(printf 'Subject: t\n\nx\n' | run sendmail root 2>&1) || rc=$?
echo "sendmail root (no daemon): exit $rc: $out"
[ "$rc" = 75 ] || fail "sendmail without a daemon should exit 75"
ok "mailq and sendmail run as themselves"
run postling check --offline --config /etc/postling/postling.toml || fail "postling check --offline"
ok "the packaged config is valid"
entry=$(run getent passwd postling) || fail "no user postling"
run getent group postling >/dev/null || fail "no group postling"
echo "$entry"
[ "$(cut -d: -f6,7 <<<"$entry")" = /var/lib/postling:/usr/sbin/nologin ] || fail "home or shell"
ok "system user and group postling"
[ "$(run stat -c '%U:%G %a' /var/lib/postling)" = "postling:postling 755" ] || fail "/var/lib/postling owner or mode"
ok "/var/lib/postling postling:postling 0755"
unit=/lib/systemd/system/postling.service
run test -f "$unit" || fail "no $unit"
grep -q '^ExecStart=/usr/sbin/postling serve --config /etc/postling/postling.toml$' "$root$unit" ||
  fail "ExecStart in $unit"
run test -L /etc/systemd/system/multi-user.target.wants/postling.service || fail "unit not enabled"
ok "$unit installed and enabled"
run dpkg-query -W -f='${Conffiles}\n' postling | grep -q '/etc/postling/postling.toml' || fail "conffile"
ok "/etc/postling/postling.toml is a conffile"
# systemd-analyze verify checks that ExecStart is executable; in a chroot,
# point it at the chroot's binary (the way scripts/verify-unit.sh does).
work=$(mktemp -d)
sed "s|/usr/sbin/postling|$root/usr/sbin/postling|" "$root$unit" >"$work/postling.service"
vout=$(systemd-analyze verify "$work/postling.service" 2>&1) || {
  echo "$vout"
  rm -rf "$work"
  fail "systemd-analyze verify"
}
rm -rf "$work"
if grep -q postling.service <<<"$vout"; then
  echo "$vout"
  fail "systemd-analyze verify warns about the unit"
fi
ok "systemd-analyze verify accepts the unit"

step "dpkg -i again (postinst is idempotent)"
run dpkg -i "$pkg" >/dev/null
ok "reinstalled"

step "dpkg --purge"
run dpkg --purge postling
if run dpkg-query -W -f='${Status}\n' postling 2>/dev/null | grep -q 'installed\|config-files'; then
  fail "still known to dpkg after purge"
fi
for f in /usr/sbin/postling /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq "$unit" \
  /etc/postling /var/lib/postling /etc/systemd/system/multi-user.target.wants/postling.service; do
  if run test -e "$f" || run test -L "$f"; then fail "$f is still there"; fi
done
ok "purged: binary, links, unit, enablement, /etc/postling and /var/lib/postling are gone"
if run getent passwd postling >/dev/null; then
  echo "note: the postling user stays after purge (Debian keeps system users)"
fi

if [ -n "$root" ]; then
  step "without adduser: postinst falls back to useradd"
  run userdel postling
  run groupdel postling 2>/dev/null || true
  for t in adduser addgroup; do
    if [ -e "$root/usr/sbin/$t" ]; then mv "$root/usr/sbin/$t" "$root/usr/sbin/$t.hidden"; fi
  done
  run dpkg -i "$pkg" >/dev/null
  entry=$(run getent passwd postling) || fail "no user postling (useradd)"
  echo "$entry"
  [ "$(cut -d: -f6,7 <<<"$entry")" = /var/lib/postling:/usr/sbin/nologin ] || fail "home or shell (useradd)"
  [ "$(run stat -c '%U:%G %a' /var/lib/postling)" = "postling:postling 755" ] || fail "/var/lib/postling (useradd)"
  run dpkg --purge postling >/dev/null
  ok "user made by useradd; purged again"
fi

step "PASS"

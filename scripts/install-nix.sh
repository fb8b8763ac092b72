#!/usr/bin/env bash
# Install the two real-Nix tiers the tests and the demo run against, idempotently.
#
#   old tier:  Nix 2.8.0 from Debian 12 (apt, on the host: /usr/bin/nix*)
#   main tier: Nix 2.26.3 from Debian 13, unpacked into a minimal Debian 13 root made with
#              debootstrap, and run on the host through that root's own dynamic loader, so
#              the sandbox, the post-build-hook and the test's files all live on the host.
#
# The Debian mirror is read from this machine's own apt sources; nothing here names a host.
# Result: $TRACEHOOK_NIX_CACHE/nix-2.26/bin/{nix,nix-build,nix-store,...} (wrappers) and
# /usr/bin/nix* (2.8). Re-running is cheap: a finished root is marked and reused.
set -euo pipefail

CACHE="${TRACEHOOK_NIX_CACHE:-/var/cache/tracehook-nix}"
ROOT="$CACHE/nix-2.26/rootfs"
BIN="$CACHE/nix-2.26/bin"
SUITE_NEW="${TRACEHOOK_DEBIAN_NEW_SUITE:-trixie}"

log() { printf 'install-nix: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The first Debian archive URI in the machine's apt sources (deb822 or one-line format),
# skipping the security archive.
debian_mirror() {
  local uri
  uri=$(
    {
      for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN{IGNORECASE=1} /^URIs:/ {for (i = 2; i <= NF; i++) print $i}' "$f"
      done
      for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f"
      done
    } | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1
  )
  if [ -z "$uri" ]; then
    log "no Debian archive found in /etc/apt/sources*; set TRACEHOOK_DEBIAN_MIRROR"
    exit 3
  fi
  printf '%s\n' "${uri%/}"
}

install_host_packages() {
  local missing=()
  command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
  # Builders run in the sandbox with no libc: the busybox must be the static one.
  dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
    missing+=(busybox-static)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    as_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
}

write_wrappers() {
  mkdir -p "$BIN.tmp"
  local libs="$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu"
  # Nix re-executes /proc/self/exe for its remote-build hook; run through the loader that
  # would be the loader, so the hook is switched off (no remote builders are used here).
  cat >"$BIN.tmp/nix" <<EOF
#!/bin/sh
# Nix 2.26 from $ROOT, run on the host with that root's loader and libraries.
exec "$ROOT/lib64/ld-linux-x86-64.so.2" --library-path "$libs" --argv0 "\${0##*/}" \\
  "$ROOT/usr/bin/nix" --option build-hook "" "\$@"
EOF
  chmod 755 "$BIN.tmp/nix"
  local n
  for n in nix-build nix-store nix-instantiate nix-env nix-hash nix-copy-closure \
    nix-collect-garbage nix-prefetch-url nix-shell nix-channel; do
    ln -sf nix "$BIN.tmp/$n"
  done
  rm -rf "$BIN"
  mv "$BIN.tmp" "$BIN"
}

install_new_tier() {
  if [ -f "$ROOT/.tracehook-complete" ] && [ -x "$ROOT/usr/bin/nix" ]; then
    return 0
  fi
  local mirror="${TRACEHOOK_DEBIAN_MIRROR:-}"
  [ -n "$mirror" ] || mirror=$(debian_mirror)
  local tmp="$ROOT.partial"
  rm -rf "$tmp"
  mkdir -p "$CACHE/nix-2.26"
  log "debootstrap --variant=minbase $SUITE_NEW (mirror from apt sources)"
  as_root debootstrap --variant=minbase "$SUITE_NEW" "$tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 || {
    tail -n 20 "$CACHE/debootstrap.log" >&2
    log "debootstrap failed; full log in $CACHE/debootstrap.log"
    exit 3
  }
  cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
  log "apt-get install nix-bin inside the $SUITE_NEW root"
  as_root mount -t proc proc "$tmp/proc"
  local rc=0
  as_root chroot "$tmp" /bin/sh -c \
    'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nix-bin busybox-static && apt-get clean' \
    >"$CACHE/chroot-apt.log" 2>&1 || rc=$?
  as_root umount "$tmp/proc" || true
  if [ "$rc" != 0 ]; then
    tail -n 20 "$CACHE/chroot-apt.log" >&2
    log "installing nix-bin in the root failed; log in $CACHE/chroot-apt.log"
    exit 3
  fi
  touch "$tmp/.tracehook-complete"
  rm -rf "$ROOT"
  mv "$tmp" "$ROOT"
}

main() {
  install_host_packages
  install_new_tier
  write_wrappers
  local v_new v_old
  v_new=$("$BIN/nix" --version)
  v_old=$(/usr/bin/nix --version)
  log "main tier: $v_new ($BIN)"
  log "old tier:  $v_old (/usr/bin)"
  printf 'TRACEHOOK_NIX_2_26_BIN=%s\nTRACEHOOK_NIX_2_8_BIN=%s\n' "$BIN" /usr/bin
}

main "$@"

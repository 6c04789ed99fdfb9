# shellcheck shell=bash
# The second Nix the suite runs against: Debian trixie's nix-bin (2.26),
# installed privately under target/tools/nix-2.26/ without touching the
# system's packages, apt lists or /etc.
#
# How: a private apt configuration (its own sources.list, lists, cache and an
# empty dpkg status) downloads nix-bin and the libraries it links against
# from trixie, through the Debian mirror the system's own apt sources name
# (NIX_2_26_MIRROR overrides it) and with the system's proxy settings; `dpkg -x` unpacks them into target/tools/nix-2.26/root; and
# bin/nix, bin/nix-store, bin/nix-instantiate are wrappers that start the
# binary through that root's own dynamic loader with --library-path and
# --argv0, so it uses trixie's glibc and libraries, not the system's.
#
# Run this way /proc/self/exe is the loader, so Nix's build hook
# (`/proc/self/exe __build-remote`) cannot start: whoever runs this Nix sets
# `build-hook =` and `builders =` in NIX_CONFIG. trixie's Nix also defaults
# to `build-users-group = nixbld`, a group its postinst would create: without
# the package installed, set `build-users-group =` too (builds run as root,
# like the single-user Nix 2.8). The store (/nix/store) is shared with the
# system's Nix 2.8.
#
# Usage: . scripts/lib/nix-versions.sh; ensure_nix_2_26
# Afterwards NIX_2_26_BIN is the directory holding the wrappers; the
# NIX_CONFIG lines this Nix needs are in NIX_2_26_CONFIG.

NIX_2_26_VERSION=2.26
NIX_2_26_DIR=${NIX_2_26_DIR:-$PWD/target/tools/nix-2.26}
NIX_2_26_CONFIG='build-hook =
builders =
build-users-group ='

# The libraries nix-bin links against, and theirs. Not the perl, curl and
# bash-static dependencies: only the `nix` binary itself is used.
_nix_2_26_packages() {
  local libs
  libs=$(apt-cache depends --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances nix-bin |
    sed -n 's/^ *Depends: \(lib[^ ]*\)$/\1/p' | grep -v -- '-perl$')
  [ -n "$libs" ] || return 1
  echo nix-bin
  # shellcheck disable=SC2086 # one package per word
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances $libs |
    grep -v '^[ <]' | sort -u
}

# The Debian archive this machine's apt already uses: the Repo-URI of its
# main suite (as configured: "bookworm" or "stable", not "-security",
# "-updates" or "-backports"). Nothing here names a mirror, so a machine
# behind its own mirror or proxy fetches trixie from where it fetches
# everything else.
_debian_mirror() {
  if [ -n "${NIX_2_26_MIRROR:-}" ]; then
    echo "$NIX_2_26_MIRROR"
    return 0
  fi
  local os
  os=$(. /etc/os-release 2>/dev/null && echo "${ID:-}")
  if [ "$os" != debian ]; then
    echo "error: Nix $NIX_2_26_VERSION comes from Debian trixie, and this system ($os) has no Debian archive in its apt sources." >&2
    echo "  set NIX_2_26_MIRROR to a Debian mirror's URL (the directory holding dists/trixie)." >&2
    return 1
  fi
  local mirror
  mirror=$(apt-get indextargets --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' 'Identifier: Packages' |
    awk '$1 == "deb" && $2 !~ /-/ { print $3; exit }')
  if [ -z "$mirror" ]; then
    echo "error: no Debian archive in this machine's apt sources (apt-get indextargets lists none)." >&2
    echo "  set NIX_2_26_MIRROR to a Debian mirror's URL (the directory holding dists/trixie)." >&2
    return 1
  fi
  echo "$mirror"
}

# The system's network settings for apt (proxies, retries, TLS), which the
# private configuration would otherwise not read.
_apt_network_config() {
  apt-config dump | grep -E '^Acquire::(http|https|ftp|socks|Retries|ForceIPv4|ForceIPv6)(::| )' || true
}

_nix_2_26_wrapper() {
  local name=$1 root=$NIX_2_26_DIR/root
  local libdir=$root/usr/lib/x86_64-linux-gnu
  cat > "$NIX_2_26_DIR/bin/$name.tmp" <<SH
#!/bin/sh
# trixie's Nix $NIX_2_26_VERSION from $root, through its own loader
# (see scripts/lib/nix-versions.sh).
exec "$libdir/ld-linux-x86-64.so.2" --library-path "$libdir:$root/lib/x86_64-linux-gnu" --argv0 "$name" "$root/usr/bin/nix" "\$@"
SH
  chmod +x "$NIX_2_26_DIR/bin/$name.tmp"
  mv "$NIX_2_26_DIR/bin/$name.tmp" "$NIX_2_26_DIR/bin/$name"
}

ensure_nix_2_26() {
  export NIX_2_26_BIN=$NIX_2_26_DIR/bin
  if [ -f "$NIX_2_26_DIR/.installed" ] &&
    "$NIX_2_26_BIN/nix" --version 2>/dev/null | grep -q " $NIX_2_26_VERSION\."; then
    echo "NIX_2_26_BIN=$NIX_2_26_BIN"
    return 0
  fi
  if [ "$(uname -m)" != x86_64 ]; then
    echo "error: the private Nix $NIX_2_26_VERSION is set up for x86_64 only." >&2
    return 1
  fi
  for tool in apt-get apt-cache dpkg; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "error: installing Nix $NIX_2_26_VERSION privately needs $tool (Debian/Ubuntu)." >&2
      return 1
    fi
  done

  echo "==> installing trixie's nix-bin ($NIX_2_26_VERSION) under $NIX_2_26_DIR" >&2
  local apt=$NIX_2_26_DIR/apt
  rm -rf "$NIX_2_26_DIR/root" "$NIX_2_26_DIR/bin" "$NIX_2_26_DIR/.installed"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc/sources.list.d" \
    "$apt/etc/preferences.d" "$apt/etc/apt.conf.d" "$apt/debs" \
    "$NIX_2_26_DIR/root" "$NIX_2_26_DIR/bin"
  : > "$apt/status"
  local mirror
  mirror=$(_debian_mirror) || return 1
  echo "    from $mirror" >&2
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
    > "$apt/etc/sources.list"
  cat > "$apt/apt.conf" <<CONF
Dir::State "$apt";
Dir::State::lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Dir::Etc::sourcelist "$apt/etc/sources.list";
Dir::Etc::sourceparts "$apt/etc/sources.list.d";
Dir::Etc::preferencesparts "$apt/etc/preferences.d";
Dir::Etc::parts "$apt/etc/apt.conf.d";
APT::Architecture "amd64";
Acquire::Languages "none";
APT::Sandbox::User "root";
CONF
  _apt_network_config >> "$apt/apt.conf"
  # The system's apt-get may lack the trixie key file; debian-archive-keyring
  # on bookworm ships it in debian-archive-keyring.gpg.
  (
    set -e
    export APT_CONFIG=$apt/apt.conf DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    local packages
    packages=$(_nix_2_26_packages)
    cd "$apt/debs"
    # shellcheck disable=SC2086 # one package per word
    apt-get download -qq $packages >&2
    local deb
    for deb in "$apt"/debs/*.deb; do
      dpkg -x "$deb" "$NIX_2_26_DIR/root"
    done
  ) || {
    echo "error: could not download trixie's nix-bin with apt-get (see above)." >&2
    return 1
  }

  local name
  for name in nix nix-store nix-instantiate nix-build nix-env; do
    _nix_2_26_wrapper "$name"
  done
  if ! "$NIX_2_26_BIN/nix" --version | grep -q " $NIX_2_26_VERSION\."; then
    echo "error: $NIX_2_26_BIN/nix does not report Nix $NIX_2_26_VERSION:" >&2
    "$NIX_2_26_BIN/nix" --version >&2 || true
    return 1
  fi
  rm -rf "$apt/debs" "$apt/cache/archives"
  touch "$NIX_2_26_DIR/.installed"
  echo "NIX_2_26_BIN=$NIX_2_26_BIN"
}

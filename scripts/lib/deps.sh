# shellcheck shell=bash
# Makes sure the programs the tests and the demo run for real are installed.
# Usage: ensure_deps "command:debian-package" ...
# As root on Debian/Ubuntu the missing packages are installed with apt-get;
# otherwise the exact install command is printed and the script stops.

ensure_deps() {
  local missing=() spec cmd pkg
  for spec in "$@"; do
    cmd=${spec%%:*}
    pkg=${spec#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0

  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "error: missing ${missing[*]}." >&2
    echo "  install them with: sudo apt-get install ${missing[*]}" >&2
    echo "  (or run this script as root on Debian/Ubuntu and it installs them itself)" >&2
    exit 1
  fi
}

# Nix from Debian's nix-bin is used single-user: the store must be writable.
ensure_nix_usable() {
  if ! nix --version >/dev/null 2>&1; then
    echo "error: 'nix --version' fails; is nix-bin installed correctly?" >&2
    exit 1
  fi
  if [ ! -w /nix/store ] && [ ! -S /nix/var/nix/daemon-socket/socket ]; then
    echo "error: /nix/store is not writable and no nix-daemon is running." >&2
    echo "  run as root (single-user Nix) or start nix-daemon (systemctl start nix-daemon)." >&2
    exit 1
  fi
}

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
    # apt's own progress only when it fails.
    local log
    log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } > "$log" 2>&1; then
      cat "$log" >&2
      rm -f "$log"
      echo "error: apt-get could not install ${missing[*]} (see above)." >&2
      exit 1
    fi
    rm -f "$log"
  else
    echo "error: missing ${missing[*]}." >&2
    echo "  install them with: sudo apt-get install ${missing[*]}" >&2
    echo "  (or run this script as root on Debian/Ubuntu and it installs them itself)" >&2
    exit 1
  fi
}

# Nix from Debian's nix-bin is used single-user: its store under /nix must be
# writable by whoever runs it, unless a nix-daemon serves it. Debian's
# package creates no /nix; Nix creates /nix/store and /nix/var itself once
# /nix exists and is writable. So, as Nix's own single-user install does:
# as root a missing /nix is created (0755, root's); as anyone else the
# message says what to run.
ensure_nix_store() {
  if [ -S /nix/var/nix/daemon-socket/socket ]; then
    return 0
  fi
  if [ ! -e /nix ] && [ "$(id -u)" -eq 0 ]; then
    echo "==> creating /nix for single-user Nix (mkdir -m 0755 /nix)" >&2
    mkdir -m 0755 /nix
  fi
  # The deepest of /nix, /nix/store that exists must be writable: Nix
  # creates the rest.
  local dir=/nix
  [ -d /nix/store ] && dir=/nix/store
  if [ -d "$dir" ] && [ -w "$dir" ]; then
    return 0
  fi
  local user
  user=$(id -un)
  if [ ! -e /nix ]; then
    echo "error: /nix does not exist, and only root can create it; no nix-daemon is running." >&2
  else
    echo "error: $dir is not writable by $user, and no nix-daemon is running." >&2
  fi
  echo "  for single-user Nix (as Nix's own installer does), run:" >&2
  if [ ! -e /nix ]; then
    echo "    sudo mkdir -m 0755 /nix && sudo chown $user /nix" >&2
  else
    echo "    sudo chown -R $user /nix" >&2
  fi
  echo "  or start the nix-daemon and use the store through it:" >&2
  echo "    sudo systemctl start nix-daemon" >&2
  exit 1
}

# The system's Nix answers, and its store is usable (ensure_nix_store).
ensure_nix_usable() {
  if ! nix --version >/dev/null 2>&1; then
    echo "error: 'nix --version' fails; is nix-bin installed correctly?" >&2
    exit 1
  fi
  ensure_nix_store
}

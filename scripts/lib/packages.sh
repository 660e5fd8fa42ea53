# shellcheck shell=bash
# Sourced by the scripts in scripts/: installs missing Debian packages the same way everywhere.

# install_packages PKG...: as root with apt-get, one index refresh and one install without
# recommends (prometheus would pull exporters, docker-compose a whole Docker engine); otherwise
# say what to install and exit 1. Does nothing without arguments.
install_packages() {
  [ "$#" -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing $*" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "missing: $*. Install them (Debian/Ubuntu: sudo apt-get install -y --no-install-recommends $*) and re-run." >&2
    exit 1
  fi
}

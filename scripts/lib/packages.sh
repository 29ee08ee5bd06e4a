# Sourced by scripts/test and scripts/bench: install Debian packages a run needs when their command is
# missing (a fresh machine has only the Rust toolchain). Usage: need COMMAND PACKAGE [GLOB-OF-BINARY]
need() {
  local command=$1 package=$2 glob=${3:-}
  if command -v "$command" >/dev/null 2>&1; then return; fi
  if [ -n "$glob" ] && compgen -G "$glob" >/dev/null; then return; fi
  echo "installing $package from Debian's packages (for $command)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" > /dev/null
}

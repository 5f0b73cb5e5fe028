# Sourced by the benchmarks. check_binary BIN: refuses (exit 1, with the fix) a twinvol binary
# that is missing, or that is older than any source file of the checkout this script sits in:
# a binary built from other sources measures other code, and its figures would be reported
# against this checkout. ALLOW_STALE=1 lets an old binary through. Prints the binary and its
# build time, to go above the figures.
check_binary() {
  local bin=$1 src newer
  [ -x "$bin" ] || { echo "no twinvol binary at $bin: cargo build --release --bin twinvol, or set TWINVOL" >&2; exit 1; }
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -z "${ALLOW_STALE:-}" ] && [ -d "$src/src" ]; then
    newer=$(find "$src/src" "$src/Cargo.toml" "$src/Cargo.lock" -newer "$bin" -type f 2>/dev/null | head -3)
    if [ -n "$newer" ]; then
      echo "$bin is older than $(echo $newer | tr ' ' ','): rebuild it (cargo build --release --bin twinvol) or set ALLOW_STALE=1" >&2
      exit 1
    fi
  fi
  echo "# binary: $("$bin" --version) ($bin, built $(date -r "$bin" -u +%FT%TZ))"
}

#!/usr/bin/env bash
# build-deb.sh [--profile PROFILE] [--output DIR] [--no-build]: build twinvol_<version>_<arch>.deb.
# Builds the binary (release profile unless told), generates the man pages and shell
# completions from the binary's own clap definitions, then packs with `cargo deb --no-build`
# (assets in Cargo.toml [package.metadata.deb]). Prints the path of the .deb on stdout.
# --no-build packs the binary already in the profile's directory (tests: no nested cargo build).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
output=""
build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --output) output="${2:?--output needs a value}"; shift 2 ;;
    --no-build) build=no; shift ;;
    *) echo "usage: build-deb.sh [--profile PROFILE] [--output DIR] [--no-build]" >&2; exit 2 ;;
  esac
done

command -v cargo-deb >/dev/null 2>&1 || {
  echo "cargo-deb is missing: run scripts/test-deps.sh (cargo install cargo-deb --locked)" >&2
  exit 1
}

target="${CARGO_TARGET_DIR:-target}"
case "$profile" in
  dev|test) out_dir="$target/debug" ;;
  *) out_dir="$target/$profile" ;;
esac

if [ "$build" = yes ]; then
  cargo build --quiet --profile "$profile" --bin twinvol >&2
fi
bin="$out_dir/twinvol"
[ -x "$bin" ] || { echo "no binary at $bin: build it or drop --no-build" >&2; exit 1; }

rm -rf "$out_dir/man" "$out_dir/completions"
mkdir -p "$out_dir/man" "$out_dir/completions"
"$bin" gen-man "$out_dir/man"
gzip -9nf "$out_dir"/man/*.1
"$bin" completions bash >"$out_dir/completions/twinvol.bash"
"$bin" completions zsh >"$out_dir/completions/_twinvol"
"$bin" completions fish >"$out_dir/completions/twinvol.fish"

args=(deb --no-build --profile "$profile")
if [ -n "$output" ]; then
  mkdir -p "$output"
  args+=(--output "$output")
fi
# The dev profile (tests) draws a warning from cargo-deb; releases use the release profile.
cargo "${args[@]}" 2> >(grep -v -e "dev profile is not supported" -e "To enable debug symbols" >&2) | tail -n 1

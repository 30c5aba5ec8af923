#!/usr/bin/env bash
# Puts the ONNX Runtime C/C++ headers (Debian's libonnxruntime-dev) where the build finds them.
#
#   custom_ops/fetch_ort_headers.sh [CACHE_DIR]     (default: .cache/ort-headers at the repo root)
#
# - Already found (ORT_INCLUDE_DIR, or /usr/include/onnxruntime): nothing to do.
# - A Debian release that carries libonnxruntime-dev (13 "trixie" and later), as root:
#   apt-get install it.
# - Otherwise (Debian 12 and older): download that package with apt from the next
#   release's suite of the archive this machine already uses (taken from its apt
#   sources, no host hard-coded) and unpack only its headers into CACHE_DIR.
# Prints the header folder (the one holding onnxruntime_c_api.h) on its last line.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache_dir=${1:-$repo_root/.cache/ort-headers}
package=libonnxruntime-dev
header=onnxruntime_c_api.h

say() { echo "fetch_ort_headers: $*" >&2; }
done_at() { say "headers in $1"; echo "$1"; exit 0; }

[[ -n "${ORT_INCLUDE_DIR:-}" && -f "$ORT_INCLUDE_DIR/$header" ]] && done_at "$ORT_INCLUDE_DIR"
[[ -f "$cache_dir/include/onnxruntime/$header" ]] && done_at "$cache_dir/include/onnxruntime"
[[ -f /usr/include/onnxruntime/$header ]] && done_at /usr/include/onnxruntime

if ! command -v apt-get >/dev/null; then
  say "no apt-get here: install ONNX Runtime's headers (e.g. the include/ folder of an onnxruntime"
  say "release archive) and set ORT_INCLUDE_DIR to the folder holding $header"
  exit 1
fi

# 1. The machine's own release carries the package: install it the normal way.
if [[ $(id -u) == 0 ]] && apt-cache show "$package" >/dev/null 2>&1; then
  say "installing $package with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >&2
  done_at /usr/include/onnxruntime
fi

# 2. Fetch the package from the next release's suite of the archive in use.
. /etc/os-release
case "${VERSION_CODENAME:-}" in
  buster|bullseye|bookworm) suite=trixie ;;
  *) say "apt does not offer $package on ${PRETTY_NAME:-this system} (run 'apt-get update' first?)"; exit 1 ;;
esac

# The URI that serves this release's main suite, from one-line or deb822 sources.
shopt -s nullglob
one_line=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
deb822=(/etc/apt/sources.list.d/*.sources)
archive=$({ cat "${one_line[@]}" 2>/dev/null || true; } |
  awk -v s="$VERSION_CODENAME" '$1 == "deb" && $3 == s { print $2; exit }')
if [[ -z "$archive" ]]; then
  archive=$({ cat "${deb822[@]}" 2>/dev/null || true; } | awk -v s="$VERSION_CODENAME" '
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) { print uri; exit } }
    /^$/ { uri = "" }')
fi
[[ -n "$archive" ]] || { say "no apt source for '$VERSION_CODENAME' found to derive the archive from"; exit 1; }
say "fetching $package from suite '$suite' of $archive"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
  "$archive" "$suite" "$keyring" > "$work/etc/next.sources"
apt_private=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$work/etc"
             -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
             -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)")
apt-get "${apt_private[@]}" -q update >&2
(cd "$work" && apt-get "${apt_private[@]}" -q download "$package" >&2)

deb=$(ls "$work"/${package}_*.deb)
mkdir -p "$work/unpacked"
dpkg-deb -x "$deb" "$work/unpacked"
rm -rf "$cache_dir"
mkdir -p "$cache_dir/include"
cp -r "$work/unpacked/usr/include/onnxruntime" "$cache_dir/include/"
basename "$deb" > "$cache_dir/SOURCE"
done_at "$cache_dir/include/onnxruntime"

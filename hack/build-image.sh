#!/usr/bin/env bash
# Builds the image of `beemesh node` from the Containerfile, with buildah or else podman.
#
#   hack/build-image.sh [--tag TAG] [--containerfile | --binary PATH]
#
# By default the Containerfile is built when both its base images are in local storage
# or can be pulled. Where no registry is reachable (as on this project's development
# machines) it assembles the same image locally instead: the binary is built on the
# host with cargo (or taken from --binary), and the two base images are replaced by
# stand-ins built from this machine: the runtime base by a rootfs holding only what the
# binary needs (the shared libraries ldd lists, /etc/passwd and /etc/group with the
# user nonroot (65532), the host's CA certificates), the builder by the binary itself.
# The Containerfile's final stage (labels, user, state directory, entrypoint) is then
# built on top, unchanged, so both ways give the same image layout.
#
#   --tag TAG          image name (default $BEEMESH_IMAGE, else localhost/beemesh:<version>)
#   --containerfile    build the Containerfile only; fail if a base image cannot be had
#   --binary PATH      assemble locally from this binary, with the libraries it uses
#                      on this host
#
# Environment: BEEMESH_IMAGE, BUILDER_IMAGE and RUNTIME_IMAGE (base images, defaults
# from the Containerfile), CARGO_TARGET_DIR and CARGO_BUILD_JOBS for the host build.
set -euo pipefail

cd "$(dirname "$0")/.."

die() {
  echo "build-image.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# The default of a Containerfile ARG, so that the script and the file cannot disagree.
containerfile_arg() {
  sed -n "s/^ARG $1=//p" Containerfile | head -n 1
}

version=$(awk -F'"' '/^\[/ { pkg = ($0 == "[package]") } pkg && /^version *=/ { print $2; exit }' Cargo.toml)
[ -n "$version" ] || die "no version found in Cargo.toml's [package] section"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi

tag=${BEEMESH_IMAGE:-localhost/beemesh:$version}
builder_image=${BUILDER_IMAGE:-$(containerfile_arg BUILDER_IMAGE)}
runtime_image=${RUNTIME_IMAGE:-$(containerfile_arg RUNTIME_IMAGE)}
mode=auto
binary=

while [ $# -gt 0 ]; do
  case "$1" in
    --tag)
      [ $# -ge 2 ] || die "--tag needs a value"
      tag=$2
      shift 2
      ;;
    --containerfile)
      mode=containerfile
      shift
      ;;
    --binary)
      [ $# -ge 2 ] || die "--binary needs a path"
      mode=local
      binary=$2
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if command -v buildah >/dev/null 2>&1; then
  tool=buildah
elif command -v podman >/dev/null 2>&1; then
  tool=podman
else
  die "neither buildah nor podman is installed (Debian: apt-get install buildah)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# True when the image is in local storage or could be pulled; a failed pull's reason
# is left in $work/pull.err.
have_image() {
  "$tool" inspect --type image "$1" >/dev/null 2>&1 ||
    "$tool" pull -q "$1" >/dev/null 2>"$work/pull.err"
}

if [ "$mode" != local ]; then
  for base in "$builder_image" "$runtime_image"; do
    have_image "$base" && continue
    reason=$(tail -n 1 "$work/pull.err")
    [ "$mode" = auto ] || die "cannot pull base image $base: $reason"
    echo "base image $base cannot be pulled ($reason);" >&2
    echo "assembling the image from a host build and a local rootfs instead" >&2
    mode=local
    break
  done
fi

if [ "$mode" != local ]; then
  "$tool" build -f Containerfile \
    --build-arg BUILDER_IMAGE="$builder_image" \
    --build-arg RUNTIME_IMAGE="$runtime_image" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    -t "$tag" .
else
  if [ -z "$binary" ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo is not installed; build the binary elsewhere and pass --binary PATH"
    cargo build --profile dist --locked
    binary=${CARGO_TARGET_DIR:-target}/dist/beemesh
  fi
  if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    die "$binary is not an executable file"
  fi
  libs=$(ldd "$binary") || die "ldd $binary failed: not a dynamically linked binary for this machine?"
  if grep -q 'not found' <<<"$libs"; then
    die "shared libraries of $binary are missing on this host:
$libs"
  fi
  [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt (Debian: apt-get install ca-certificates)"

  ctx=$work/context
  # Stand-in for the runtime base image: what distroless/cc provides that the binary uses.
  rootfs=$ctx/rootfs
  mkdir -p "$rootfs"/{etc/ssl/certs,tmp,var/lib}
  chmod 1777 "$rootfs/tmp"
  # The absolute paths in ldd's output: every library and the dynamic loader (the
  # vdso has none: the kernel provides it).
  while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done < <(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$libs")
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$rootfs/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$rootfs/etc/group"
  # /etc/hosts first, as in distroless: in a pod it names the pod itself.
  echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
  cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  # Stand-in for the builder stage: its two outputs, as the Containerfile makes them.
  install -D -m 0755 "$binary" "$ctx/out/beemesh"
  install -d -m 0700 "$ctx/out/var-lib/beemesh"

  final_stage=$(awk '/^FROM \$\{RUNTIME_IMAGE\}/ { found = 1; print "FROM runtime"; next } found' Containerfile)
  [ -n "$final_stage" ] || die "Containerfile has no final stage 'FROM \${RUNTIME_IMAGE}'"
  {
    printf '%s\n' 'FROM scratch AS runtime' 'COPY rootfs/ /' 'FROM scratch AS builder' 'COPY out/ /out/'
    printf '%s\n' "$final_stage"
  } >"$ctx/Containerfile"

  "$tool" build -f "$ctx/Containerfile" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    -t "$tag" "$ctx"
fi

echo "built $tag ($tool, $([ "$mode" = local ] && echo "assembled locally" || echo "from the Containerfile")):"
"$tool" images "$tag"

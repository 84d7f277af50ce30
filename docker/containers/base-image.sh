#!/usr/bin/env bash
# Build a Debian base image from Debian's own packages with debootstrap and import it into podman, for machines
# that reach a package mirror but no image registry (the container test, tests/containers/). Cached: a second run
# with the image already in podman's store does nothing.
#
#   docker/containers/base-image.sh IMAGE_NAME [SUITE]
#
# The mirror is the one apt on this machine already uses (its sources), so no host name is written here.
set -euo pipefail
IMAGE=${1:?usage: base-image.sh IMAGE_NAME [SUITE]}
SUITE=${2:-bookworm}
CACHE=${HDM_CONTAINER_CACHE:-/var/cache/hdm-containers}
PODMAN=(podman --runtime runc)

if "${PODMAN[@]}" image exists "$IMAGE"; then
  exit 0
fi
MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | grep -oE '^(URIs:|deb) +[^ ]+' | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
[ -n "$MIRROR" ] || { echo "base-image.sh: no Debian mirror in /etc/apt sources" >&2; exit 1; }

mkdir -p "$CACHE"
TARBALL="$CACHE/$SUITE-minbase.tar"
if [ ! -s "$TARBALL" ]; then
  ROOT=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOT"' EXIT
  # minbase: apt and dpkg only; the Dockerfiles install what they need.
  nice debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
  tar -C "$ROOT" --numeric-owner -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi
"${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
echo "base-image.sh: $IMAGE from $TARBALL"

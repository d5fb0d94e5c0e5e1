#!/usr/bin/env bash
# Builds the local busybox test image without any registry (none is reachable here):
# a rootfs holding busybox-static and its applets as symlinks, imported into Podman.
# Tagged :latest and :1.35; examples use :1.35 so that Kubernetes' default
# imagePullPolicy (Always for :latest) does not ask a registry.
set -euo pipefail

IMAGE=${BEEMESH_TEST_IMAGE:-localhost/busybox}

if podman image exists "$IMAGE:1.35" && podman image exists "$IMAGE:latest"; then
  echo "$IMAGE:1.35 present"
  exit 0
fi

busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
if [ -z "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
  apt-get install -y -qq busybox-static >/dev/null
  busybox=/bin/busybox
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,var/www,proc,sys,dev,root}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
echo 'nobody:x:65534:65534:nobody:/:/bin/false' >>"$root/etc/passwd"
echo 'nogroup:x:65534:' >>"$root/etc/group"
tar -C "$root" -cf "$work/rootfs.tar" .
podman import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' "$work/rootfs.tar" "$IMAGE:1.35" >/dev/null
podman tag "$IMAGE:1.35" "$IMAGE:latest"
echo "built $IMAGE:1.35 and $IMAGE:latest"

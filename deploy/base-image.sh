#!/usr/bin/env bash
# Makes sure the Docker engine has the base image of legate's image, debian:bookworm-slim.
#
# The engine's copy is used when it has one; otherwise the image is pulled; when that fails (no
# registry at hand), it is built here: debootstrap's minbase bookworm, trimmed the way the official
# slim image is (no docs, man pages or locales, dpkg excludes them from later installs too, no
# service starts during installs, no apt lists), then `docker import`ed under the same name. The
# local build carries the label legate.base=debootstrap.
#
# Environment: LEGATE_BASE_IMAGE (default debian:bookworm-slim), LEGATE_DEBIAN_MIRROR (default
# http://deb.debian.org/debian). Needs root for debootstrap (uses sudo when not root).
set -euo pipefail

image=${LEGATE_BASE_IMAGE:-debian:bookworm-slim}
mirror=${LEGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image: present"
  exit 0
fi
if timeout 120 docker pull "$image" >/dev/null 2>&1; then
  echo "base image $image: pulled"
  exit 0
fi
echo "base image $image: cannot be pulled; building it with debootstrap from $mirror"

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if ! command -v debootstrap >/dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends debootstrap
fi

work=$(mktemp -d /tmp/legate-base.XXXXXX)
cleanup() { $sudo rm -rf --one-file-system "$work"; }
trap cleanup EXIT
rootfs=$work/rootfs

$sudo debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  echo "debootstrap failed (full log above was $work/debootstrap.log)" >&2
  exit 1
}

# What the official slim image does to stay small, for later installs as well.
$sudo tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
$sudo tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
$sudo tee "$rootfs/etc/apt/apt.conf.d/docker-no-recommends" >/dev/null <<'EOF'
APT::Install-Recommends "false";
EOF
# Packages must not start services inside an image build.
printf '#!/bin/sh\nexit 101\n' | $sudo tee "$rootfs/usr/sbin/policy-rc.d" >/dev/null
$sudo chmod 755 "$rootfs/usr/sbin/policy-rc.d"
$sudo rm -f "$rootfs/etc/apt/sources.list"
$sudo tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
$sudo find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
$sudo rm -rf "$rootfs"/usr/share/{man,info,groff,lintian}/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
$sudo find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
  -exec rm -rf {} +

$sudo tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'LABEL legate.base=debootstrap' \
  --message "debootstrap --variant=minbase $suite $mirror, trimmed like the slim image" \
  - "$image" >/dev/null
echo "base image $image: built ($(docker image inspect --format '{{.Size}}' "$image" | numfmt --to=iec))"

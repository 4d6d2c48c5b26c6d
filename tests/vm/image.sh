#!/usr/bin/env bash
# Builds the Debian 12 disk image the VM tests boot (tests/vm/install and
# tests/vm/vagrant) and a vagrant-libvirt box made from the same image, and
# prints the directory that holds them:
#
#   disk.qcow2      bootable image: MBR, syslinux on a FAT partition with the
#                   kernel and initrd, ext4 root (systemd, sshd, iproute2,
#                   curl, sudo, rsync and Debian's 6.1 kernel)
#   id_ed25519      the key root and the user "vagrant" accept over ssh
#   veloflux.box    the vagrant-libvirt box (box.img, metadata.json and a
#                   Vagrantfile that logs in with id_ed25519)
#   release         the kernel release the image boots
#
# debootstrap fetches the packages from the Debian mirror apt is configured
# with on this host (read from apt at run time; never written into the
# repository). Nothing is mounted: the root file system is written with
# mke2fs -d, the boot partition with mtools.
#
# Both stages are cached under VELOFLUX_VM_CACHE (default
# /var/cache/veloflux-vm), keyed by their inputs: the debootstrapped root file
# system by the mirror, the release, the package list and the code that makes
# it (about 4 minutes cold); the image by that and the rest of this script
# (about half a minute from a cached root). A run with both cached prints the
# directory at once. Runs wait for each other on a lock in the cache.
#
# Needs root and, from Debian: debootstrap, e2fsprogs, dosfstools, mtools,
# syslinux, syslinux-common, fdisk and qemu-utils (deploy/install-deps.sh vmimage).
set -euo pipefail

cache=${VELOFLUX_VM_CACHE:-/var/cache/veloflux-vm}
# The release of the host's own Debian: the image is the system the README
# tells operators to install on.
suite=bookworm
arch=amd64
disk_size=8G
# Sectors of 512 bytes: a 1 MiB aligned FAT partition for syslinux, the
# kernel and the initrd, then the root file system to the end of the disk.
boot_start=2048
boot_sectors=262144
root_start=$((boot_start + boot_sectors))
packages=(
	systemd-sysv udev dbus openssh-server iproute2 ethtool procps
	linux-image-amd64 initramfs-tools curl sudo rsync ca-certificates
)
script=$(readlink -f "${BASH_SOURCE[0]}")

say() { printf 'vm-image: %s\n' "$*" >&2; }
die() {
	say "error: $*"
	exit 1
}

check_tools() {
	[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap, and the image's files keep their owners)"
	local missing=() t
	for t in debootstrap mke2fs mkfs.vfat mcopy syslinux sfdisk qemu-img ssh-keygen apt-get; do
		command -v "$t" >/dev/null || missing+=("$t")
	done
	[[ -f /usr/lib/syslinux/mbr/mbr.bin ]] || missing+=("/usr/lib/syslinux/mbr/mbr.bin")
	((${#missing[@]} == 0)) ||
		die "missing ${missing[*]}: deploy/install-deps.sh vmimage installs them"
}

# mirror prints the URI apt fetches $suite's main component from.
mirror() {
	local uri
	uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' 2>/dev/null |
		awk -v s="$suite" '$2 == s && $3 == "main" { print $1; exit }')
	[[ -n $uri ]] || die "apt has no source for Debian $suite main (see /etc/apt/sources.list*)"
	echo "$uri"
}

# build_rootfs debootstraps into $1 and trims what a VM under test does not
# use. Its text is part of the cache key, so editing it rebuilds the root.
build_rootfs() {
	local root=$1 mirror=$2
	local include
	include=$(
		IFS=,
		echo "${packages[*]}"
	)
	# An initramfs with only what the VMs boot from (virtio disks, ext4):
	# made in seconds rather than minutes, and quicker to load under TCG.
	# debootstrap keeps these files (dpkg --force-confold), and dpkg notes
	# them as modified conffiles.
	mkdir -p "$root/etc/initramfs-tools/conf.d"
	echo MODULES=list >"$root/etc/initramfs-tools/conf.d/veloflux-vm.conf"
	printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod ext4 >"$root/etc/initramfs-tools/modules"
	debootstrap --variant=minbase --arch="$arch" --include="$include" "$suite" "$root" "$mirror" >&2 ||
		die "debootstrap $suite from $mirror failed (its log: $root/debootstrap/debootstrap.log)"
	local release
	release=$(ls "$root/lib/modules")
	[[ -n $release && -f $root/boot/vmlinuz-$release && -f $root/boot/initrd.img-$release ]] ||
		die "the root file system has no kernel and initrd"
	# Drivers no virtual machine has; some 60% of the module tree.
	local m=$root/lib/modules/$release/kernel
	rm -rf "$m/sound" "$m/drivers/gpu" "$m/drivers/media" "$m/drivers/net/wireless" \
		"$m/drivers/infiniband" "$m/drivers/staging" "$m/drivers/bluetooth" "$m/drivers/iio" \
		"$m/drivers/isdn" "$m/drivers/usb" "$m/drivers/hid" "$m/drivers/input/touchscreen" \
		"$m/net/mac80211" "$m/net/wireless" "$m/net/bluetooth" "$m/drivers/net/ethernet/mellanox"
	chroot "$root" depmod -a "$release"
	chroot "$root" apt-get clean
	rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
		"$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
}

# customize turns the root file system at $1 into the test system: its
# fstab, network, users and ssh key. $2 is the root file system's UUID, $3
# the key's directory.
customize() {
	local root=$1 uuid=$2 keys=$3
	# No fsck at boot (pass 0): every VM starts from a fresh copy of a file
	# system mke2fs has just written, and fsck costs seconds under TCG.
	echo "UUID=$uuid / ext4 errors=remount-ro 0 0" >"$root/etc/fstab"
	# Not "veloflux-vm": vagrant adds the Vagrantfile's hostname to
	# /etc/hosts only if `grep -w veloflux` finds no line, which that name
	# matches. The VM's new name then resolves through DNS only, which
	# offline takes 10 s, and so does every sudo (some 100 s of `vagrant up`).
	echo vfguest >"$root/etc/hostname"
	printf '127.0.0.1 localhost\n127.0.1.1 vfguest\n::1 localhost\n' >"$root/etc/hosts"
	# Empty: every VM made from the image gets its own on first boot.
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id"

	# The first NIC is the management network (qemu's user network, or
	# vagrant-libvirt's); the tests configure the others themselves.
	mkdir -p "$root/etc/systemd/network"
	printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/10-mgmt.network"
	chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
	# Waiting for every link delays network-online.target for links the
	# tests configure later; the management link is enough.
	mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
	printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n' \
		>"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"
	chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
		e2scrub_reap.service >/dev/null 2>&1

	# Fresh host keys for each image, not the ones of the cached root.
	rm -f "$root"/etc/ssh/ssh_host_*
	chroot "$root" ssh-keygen -A >/dev/null
	printf 'UseDNS no\nPasswordAuthentication no\n' >"$root/etc/ssh/sshd_config.d/veloflux-vm.conf"
	ssh-keygen -q -t ed25519 -N '' -C veloflux-vm -f "$keys/id_ed25519"
	install -d -m 0700 "$root/root/.ssh"
	install -m 0600 "$keys/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
	# Vagrant logs in as "vagrant" and becomes root with sudo.
	chroot "$root" useradd -m -s /bin/bash vagrant
	echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
	chmod 0440 "$root/etc/sudoers.d/vagrant"
	install -d -m 0700 "$root/home/vagrant/.ssh"
	install -m 0600 "$keys/id_ed25519.pub" "$root/home/vagrant/.ssh/authorized_keys"
	chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh
}

# write_disk writes the bootable image $4 from the root file system $1: MBR,
# syslinux, kernel and initrd of release $2 on the FAT partition, $1 as ext4
# with UUID $3.
write_disk() {
	local root=$1 release=$2 uuid=$3 out=$4
	local tmp
	tmp=$(dirname "$out")
	local raw=$tmp/disk.raw fat=$tmp/boot.fat
	truncate -s "$disk_size" "$raw"
	sfdisk -q "$raw" >/dev/null <<-EOF
		label: dos
		start=$boot_start, size=$boot_sectors, type=c, bootable
		start=$root_start, type=83
	EOF
	mkfs.vfat -n VFBOOT -C "$fat" $((boot_sectors / 2)) >/dev/null
	cat >"$tmp/syslinux.cfg" <<-EOF
		DEFAULT linux
		PROMPT 0
		TIMEOUT 1
		LABEL linux
		  KERNEL vmlinuz
		  INITRD initrd.img
		  APPEND root=UUID=$uuid ro console=ttyS0,115200 net.ifnames=0 quiet
	EOF
	mcopy -i "$fat" "$root/boot/vmlinuz-$release" ::vmlinuz
	mcopy -i "$fat" "$root/boot/initrd.img-$release" ::initrd.img
	mcopy -i "$fat" "$tmp/syslinux.cfg" ::syslinux.cfg
	syslinux --install "$fat"
	dd if="$fat" of="$raw" bs=512 seek="$boot_start" conv=notrunc status=none
	rm -f "$fat" "$tmp/syslinux.cfg"
	local root_bytes
	root_bytes=$(($(stat -c %s "$raw") - root_start * 512))
	mke2fs -q -F -t ext4 -L vfroot -U "$uuid" -d "$root" \
		-E "offset=$((root_start * 512)),lazy_itable_init=1,lazy_journal_init=1" \
		"$raw" "$((root_bytes / 1024))k"
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
	qemu-img convert -O qcow2 "$raw" "$out"
	rm -f "$raw"
}

# write_box packs the image as a vagrant-libvirt box in $1.
write_box() {
	local dir=$1 box=$1/box
	mkdir "$box"
	ln "$dir/disk.qcow2" "$box/box.img"
	cp "$dir/id_ed25519" "$box/id_ed25519"
	local gib=${disk_size%G}
	printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$gib" >"$box/metadata.json"
	cat >"$box/Vagrantfile" <<-'EOF'
		# The VeloFlux test box (tests/vm/image.sh): Debian 12, the user
		# "vagrant" with the key shipped next to this file.
		Vagrant.configure("2") do |config|
		  config.ssh.username = "vagrant"
		  config.ssh.private_key_path = File.expand_path("../id_ed25519", __FILE__)
		  config.ssh.insert_key = false
		  config.vm.provider :libvirt do |lv|
		    lv.disk_bus = "virtio"
		    lv.nic_model_type = "virtio"
		  end
		end
	EOF
	tar -C "$box" -cf "$dir/veloflux.box" metadata.json Vagrantfile box.img id_ed25519
	rm -rf "$box"
}

key_of() { sha256sum | cut -c1-16; }

work=""
# cleanup removes the work directory, after unmounting what an interrupted
# debootstrap left mounted in it (/proc, /sys of the target), innermost first.
cleanup() {
	[[ -n $work && -d $work ]] || return 0
	local m
	while read -r m; do
		umount -l "$m" || say "could not unmount $m"
	done < <(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
	rm -rf --one-file-system "$work"
}

main() {
	check_tools
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9

	local mirror_uri rootfs_key image_key
	mirror_uri=$(mirror)
	rootfs_key=$({
		echo "$suite $arch $mirror_uri ${packages[*]}"
		declare -f build_rootfs
	} | key_of)
	image_key=$({
		echo "$rootfs_key"
		cat "$script"
	} | key_of)
	local image=$cache/image-$image_key
	if [[ -f $image/.complete ]]; then
		echo "$image"
		return 0
	fi

	work=$(mktemp -d "$cache/.work.XXXXXX")
	trap cleanup EXIT
	trap 'exit 130' INT TERM

	local rootfs=$cache/rootfs-$rootfs_key.tar
	if [[ ! -f $rootfs ]]; then
		say "building the Debian 12 root file system with debootstrap from $mirror_uri (about 4 minutes, once;"
		say "cached in $cache)"
		local start=$SECONDS
		build_rootfs "$work/rootfs" "$mirror_uri"
		tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
		rm -rf "$work/rootfs"
		mv "$work/rootfs.tar" "$rootfs"
		say "root file system built in $((SECONDS - start))s"
		find "$cache" -maxdepth 1 -name 'rootfs-*.tar' ! -path "$rootfs" -delete
	fi

	say "building the VM image from the cached root file system ($cache)"
	local start=$SECONDS
	mkdir "$work/root" "$work/image"
	tar -C "$work/root" --numeric-owner -xf "$rootfs"
	local release uuid
	release=$(ls "$work/root/lib/modules")
	uuid=$(cat /proc/sys/kernel/random/uuid)
	customize "$work/root" "$uuid" "$work/image"
	write_disk "$work/root" "$release" "$uuid" "$work/image/disk.qcow2"
	rm -rf "$work/root"
	echo "$release" >"$work/image/release"
	write_box "$work/image"
	touch "$work/image/.complete"
	# Older images go: their inputs changed.
	find "$cache" -maxdepth 1 -name 'image-*' -type d ! -path "$image" -exec rm -rf {} +
	mv "$work/image" "$image"
	say "image built in $((SECONDS - start))s: $image"
	echo "$image"
}

main "$@"

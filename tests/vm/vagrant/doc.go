// Package vagrant boots deploy/Vagrantfile, unchanged, with vagrant-libvirt
// on a box made from the image of tests/vm/image.sh, and installs and checks
// VeloFlux in it through `vagrant ssh` as README.md describes.
//
// The test starts its own virtlogd and libvirtd inside a network namespace
// of its own (so vagrant-libvirt's management network, its dnsmasq and the
// forwarded ports :9090 and :8080 stay there), runs vagrant in that
// namespace too, and stops the daemons by PID at the end. The box is added
// under the name the Vagrantfile asks for, in a VAGRANT_HOME of the test;
// VAGRANT_DOTFILE_PATH keeps .vagrant/ out of the checkout. Unless
// VELOFLUX_VM_KVM=1 asks for KVM (and /dev/kvm opens), VELOFLUX_VM_EMULATE=1
// makes libvirt emulate the CPU (qemu TCG): nested KVM is not to be relied
// on, and libvirt's qemu user may not be allowed /dev/kvm even where root
// is. The Vagrantfile's provisioning installs nothing: the synced folder
// carries static binaries in bin/, so no network is needed.
//
// `vagrant destroy -f`, `vagrant box remove`, and the removal of the box's
// volume, of the libvirt network and of the storage pool the test's run
// created follow in the test's cleanup, which runs on failure too.
package vagrant

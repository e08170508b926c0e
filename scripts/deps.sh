# The host's requirements, sourced by scripts/install-deps and scripts/check-deps: the Debian
# packages Vivarium needs and, for each, a command that must be on PATH once it is installed.
# One list, so a package added here is both installed and checked.
#
# package:command pairs ("-" when the package brings no command of its own).
VIV_DEPS=(
  qemu-system-x86:qemu-system-x86_64
  qemu-utils:qemu-img
  # VM backups of stopped VMs run their block jobs in a storage daemon (from qemu-utils too).
  qemu-utils:qemu-storage-daemon
  mmdebstrap:mmdebstrap
  e2fsprogs:mkfs.ext4
  busybox-static:busybox
  curl:curl
  ca-certificates:-
  python3-venv:-
  iproute2:ip
  nftables:nft
  # VM switches: DHCP (and DNS on nat switches) per switch, run by the server.
  dnsmasq-base:dnsmasq
  g++:g++
  # cloud-init NoCloud seed images for VMs (crates/viv-storage) and the ISO tests.
  xorriso:xorriso
  # The from_image tests' local registry and the tool that pushes to it.
  docker-registry:docker-registry
  skopeo:skopeo
  # General-purpose VMs: UEFI firmware, and the machine tests' bootable ISO
  # (tests/fixtures/vm-iso/build: grub-mkrescue for BIOS and UEFI, with xorriso above).
  ovmf:-
  grub-common:grub-mkrescue
  grub-pc-bin:-
  grub-efi-amd64-bin:-
  mtools:mformat
  # The SSH gateway's tests drive OpenSSH's clients (ssh, scp, sftp, ssh-keygen) and rsync.
  openssh-client:ssh
  rsync:rsync
  # The web console's browser tests (tests/web): Playwright drives Debian's Chromium headless.
  chromium:chromium
  # gVisor, the benchmark's reference (`viv bench --gvisor`), from bookworm-backports like QEMU.
  runsc:runsc
  # PostgreSQL, the state store of a cluster (`--database`); the store's tests start a server of
  # their own from its binaries (crates/viv-test-postgres).
  postgresql:pg_lsclusters
  # The cluster benchmark's HTTP load generator (bench/cluster: requests/s on one and two servers).
  wrk:wrk
)
# package:command pairs needed only when the command is missing: another source (NodeSource, a
# Node version manager) may provide it. Debian 12's Node (18) is older than the JS SDK suite's
# engines; tests/e2b-js/run then runs it on a Node from the npm registry.
VIV_CMD_DEPS=(
  nodejs:node
  npm:npm
)
# The oldest QEMU the jail works with (private mappings of read-only memory files).
VIV_QEMU_MIN=10.0
# The oldest gVisor the benchmark runs on (its systrap platform; Debian 12's own runsc predates it).
VIV_RUNSC_MIN=0.0~20240729

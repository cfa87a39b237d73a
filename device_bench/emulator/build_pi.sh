#!/usr/bin/env bash
# Build and start an emulated Raspberry-Pi-like device on this machine: a Debian bookworm armhf (armv7l)
# rootfs run through qemu-user-static + binfmt_misc, with python3, Debian's numpy and tflite-runtime 2.14.0,
# and an sshd listening on 127.0.0.1 only. Timings taken on it are functional checks, never Pi figures.
#
#   device_bench/emulator/build_pi.sh [DIR]         # DIR holds the rootfs, keys, ssh_config and logs
#
# The default DIR is a cache outside the checkout, $LIT_NAS_PI_DIR or ~/.cache/lit_nas/pi: the rootfs takes
# ~3 minutes to build, and every clone on this machine (CI's included) then reuses it.
#   device_bench/emulator/build_pi.sh --stop [DIR]  # stop its sshd and unmount its proc
#
# Prints the ssh_config path on success; `ssh -F DIR/ssh_config lit-nas-pi` then reaches the device.
# Needs root (debootstrap, chroot, mounts) and binfmt_misc; exits 3 with the reason when the machine lacks
# them, so callers can skip. Idempotent: an existing rootfs is reused and a running sshd is kept.
set -euo pipefail
STOP=0
if [ "${1:-}" = --stop ]; then STOP=1; shift; fi
DIR=$(realpath -m "${1:-${LIT_NAS_PI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lit_nas/pi}}")
ROOT="$DIR/rootfs"
PORT="${PI_SSH_PORT:-2222}"
MIRROR="${PI_MIRROR:-http://deb.debian.org/debian}"
TFLITE_WHEEL_VERSION=2.14.0

skip() { echo "emulated Pi unavailable: $*" >&2; exit 3; }
# sshd writes its PID here (inside the chroot): --stop kills exactly that process, nobody else's sshd.
PIDFILE="$ROOT/run/lit_nas_sshd.pid"
if [ "$STOP" = 1 ]; then
  if [ -s "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    # only if that PID is still an sshd (a stale file may name a reused PID)
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q sshd; then
      kill "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
  if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc"; fi
  exit 0
fi
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, bind mounts)"
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || skip "unsupported host $(uname -m)"

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-arm-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v ssh >/dev/null || missing+=(openssh-client)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || skip "missing ${missing[*]} and no apt-get to install them"
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || skip "could not install ${missing[*]}"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || skip "cannot mount binfmt_misc"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-arm ]; then
  update-binfmts --enable qemu-arm >/dev/null 2>&1 || true
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-arm ] || skip "qemu-arm is not registered with binfmt_misc"

mkdir -p "$DIR"
if [ ! -x "$ROOT/usr/sbin/sshd" ] || [ ! -e "$ROOT/.lit_nas_ready" ]; then
  rm -rf "$ROOT"
  echo "debootstrap bookworm armhf into $ROOT (several minutes under emulation)" >&2
  debootstrap --arch=armhf --variant=minbase --include=python3,python3-numpy,openssh-server \
    bookworm "$ROOT" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$DIR/debootstrap.log" >&2; skip "debootstrap failed (log: $DIR/debootstrap.log)"; }
  # tflite-runtime: the armv7l wheel is fetched on the host (pip's platform options) and unpacked offline,
  # since the device has no pip and should not need the internet.
  wheels="$DIR/wheels"
  mkdir -p "$wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_34_armv7l \
    --python-version 311 --implementation cp --abi cp311 -d "$wheels" "tflite-runtime==$TFLITE_WHEEL_VERSION" \
    || skip "could not download the armv7l tflite-runtime wheel"
  python3 -m zipfile -e "$wheels"/tflite_runtime-*armv7l*.whl "$ROOT/usr/lib/python3/dist-packages/"
  touch "$ROOT/.lit_nas_ready"
fi

# A fresh client key and the device's authorized_keys, host keys, privilege-separation dir.
if [ ! -e "$DIR/id_ed25519" ]; then
  ssh-keygen -q -t ed25519 -N '' -C lit-nas-emulator -f "$DIR/id_ed25519"
fi
install -d -m 700 "$ROOT/root/.ssh"
install -m 600 "$DIR/id_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
mkdir -p "$ROOT/run/sshd"
chroot "$ROOT" /usr/bin/ssh-keygen -A >/dev/null

# A proc of its own (not a bind mount: nothing under the rootfs may lead back into the host's /dev or /proc,
# so `rm -rf` of the build directory stays harmless); /dev holds the nodes debootstrap created.
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"

cat > "$DIR/ssh_config" <<CFG
Host lit-nas-pi
  HostName 127.0.0.1
  Port $PORT
  User root
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 20
CFG

if ! ssh -F "$DIR/ssh_config" lit-nas-pi true 2>/dev/null; then
  # Only the loopback address: the emulated device must never be reachable from outside.
  chroot "$ROOT" /usr/sbin/sshd -p "$PORT" -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password \
    -o PasswordAuthentication=no -o UsePAM=no -o UseDNS=no -o PidFile=/run/lit_nas_sshd.pid \
    -E /var/log/sshd.log
  for _ in $(seq 60); do
    ssh -F "$DIR/ssh_config" lit-nas-pi true 2>/dev/null && break
    sleep 1
  done
fi
ssh -F "$DIR/ssh_config" lit-nas-pi 'test "$(uname -m)" = armv7l && python3 -c "import numpy, tflite_runtime"' \
  || skip "the device did not answer over ssh on 127.0.0.1:$PORT (log: $ROOT/var/log/sshd.log)"
echo "$DIR/ssh_config"

#!/usr/bin/env bash
# Build and start an emulated Raspberry-Pi-like device on this machine, run through qemu-user-static +
# binfmt_misc, with an sshd listening on 127.0.0.1 only. Timings taken on it are functional checks, never Pi
# figures. Two devices, one per Raspberry Pi OS generation:
#
#   armv7l  (default) Debian bookworm armhf, Python 3.11, Debian's numpy 1.24, tflite-runtime 2.14.0: the
#           32-bit Pi OS that the frozen tflite-runtime still installs on (no LiteRT wheel exists for armv7l);
#           Host lit-nas-pi, 127.0.0.1:2222, cache ~/.cache/lit_nas/pi.
#   aarch64 Debian trixie arm64, Python 3.13, Debian's numpy 2, LiteRT (ai-edge-litert 2.3.0): today's 64-bit
#           Pi OS (Debian 13), where tflite-runtime cannot be installed; Host lit-nas-pi64, 127.0.0.1:2223,
#           cache ~/.cache/lit_nas/pi64.
#
#   device_bench/emulator/build_pi.sh [--arch armv7l|aarch64] [DIR]   # DIR: rootfs, keys, ssh_config, logs
#
# The default DIR is a cache outside the checkout, $LIT_NAS_PI_DIR or ~/.cache/lit_nas/pi[64]: the rootfs
# takes minutes to build, and every clone on this machine (CI's included) then reuses it.
#   device_bench/emulator/build_pi.sh --stop [--arch ...] [DIR]  # stop its sshd and unmount its proc
#
# Prints the ssh_config path on success; `ssh -F DIR/ssh_config lit-nas-pi` (or lit-nas-pi64) then reaches
# the device. Needs root (debootstrap, chroot, mounts) and binfmt_misc; exits 3 with the reason when the
# machine lacks them, so callers can skip. Idempotent: an existing rootfs is reused and a running sshd kept.
set -euo pipefail
STOP=0
ARCH=armv7l
while [ $# -gt 0 ]; do
  case "$1" in
    --stop) STOP=1; shift ;;
    --arch) ARCH="${2:-}"; shift 2 ;;
    --arch=*) ARCH="${1#--arch=}"; shift ;;
    *) break ;;
  esac
done
# Per device: Debian suite and architecture, qemu, ssh Host/port, and the interpreter wheel (name, version,
# pip platform, CPython tag) unpacked into the rootfs.
case "$ARCH" in
  armv7l) SUITE=bookworm; DEB_ARCH=armhf; QEMU=arm; HOST=lit-nas-pi; DEFAULT_PORT=2222; CACHE=pi
          WHEEL=tflite-runtime; WHEEL_VERSION=2.14.0; WHEEL_PLATFORM=manylinux_2_34_armv7l; CPY=311
          MODULE=tflite_runtime ;;
  aarch64) SUITE=trixie; DEB_ARCH=arm64; QEMU=aarch64; HOST=lit-nas-pi64; DEFAULT_PORT=2223; CACHE=pi64
          WHEEL=ai-edge-litert; WHEEL_VERSION=2.3.0; WHEEL_PLATFORM=manylinux_2_27_aarch64; CPY=313
          MODULE=ai_edge_litert ;;
  *) echo "unknown --arch '$ARCH'; valid choices: armv7l, aarch64" >&2; exit 2 ;;
esac
DIR=$(realpath -m "${1:-${LIT_NAS_PI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lit_nas/$CACHE}}")
ROOT="$DIR/rootfs"
PORT="${PI_SSH_PORT:-$DEFAULT_PORT}"
MIRROR="${PI_MIRROR:-http://deb.debian.org/debian}"

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
command -v "qemu-$QEMU-static" >/dev/null || missing+=(qemu-user-static)
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
if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU" ]; then
  update-binfmts --enable "qemu-$QEMU" >/dev/null 2>&1 || true
fi
[ -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU" ] || skip "qemu-$QEMU is not registered with binfmt_misc"

mkdir -p "$DIR"
if [ ! -x "$ROOT/usr/sbin/sshd" ] || [ ! -e "$ROOT/.lit_nas_ready" ]; then
  rm -rf "$ROOT"
  echo "debootstrap $SUITE $DEB_ARCH into $ROOT (several minutes under emulation)" >&2
  debootstrap --arch="$DEB_ARCH" --variant=minbase --include=python3,python3-numpy,openssh-server \
    "$SUITE" "$ROOT" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$DIR/debootstrap.log" >&2; skip "debootstrap failed (log: $DIR/debootstrap.log)"; }
  # The interpreter wheel is fetched on the host (pip's platform options) and unpacked offline, since the
  # device has no pip and should not need the internet; its Python dependencies other than numpy are not
  # needed by the interpreter module itself.
  wheels="$DIR/wheels"
  mkdir -p "$wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --platform "$WHEEL_PLATFORM" \
    --python-version "$CPY" --implementation cp --abi "cp$CPY" -d "$wheels" "$WHEEL==$WHEEL_VERSION" \
    || skip "could not download the $ARCH $WHEEL wheel"
  site=$(ls -d "$ROOT"/usr/lib/python3/dist-packages)
  python3 -m zipfile -e "$wheels"/"${WHEEL//-/_}"-"$WHEEL_VERSION"-*.whl "$site/"
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
Host $HOST
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

if ! ssh -F "$DIR/ssh_config" "$HOST" true 2>/dev/null; then
  # Only the loopback address: the emulated device must never be reachable from outside.
  chroot "$ROOT" /usr/sbin/sshd -p "$PORT" -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password \
    -o PasswordAuthentication=no -o UsePAM=no -o UseDNS=no -o PidFile=/run/lit_nas_sshd.pid \
    -E /var/log/sshd.log
  for _ in $(seq 60); do
    ssh -F "$DIR/ssh_config" "$HOST" true 2>/dev/null && break
    sleep 1
  done
fi
ssh -F "$DIR/ssh_config" "$HOST" "test \"\$(uname -m)\" = $ARCH && python3 -c 'import numpy, $MODULE.interpreter'" \
  || skip "the device did not answer over ssh on 127.0.0.1:$PORT (log: $ROOT/var/log/sshd.log)"
echo "$DIR/ssh_config"

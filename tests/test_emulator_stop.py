"""build_pi.sh --stop stops the sshd it started, by its recorded PID, and no other process."""

from __future__ import annotations

import subprocess
import sys

from lit_nas_cli import REPO_ROOT

SCRIPT = REPO_ROOT / "device_bench" / "emulator" / "build_pi.sh"
SLEEP = "import time; time.sleep(120)"


def test_stop_kills_the_recorded_sshd_and_spares_a_lookalike(tmp_path):
    run = tmp_path / "rootfs" / "run"
    run.mkdir(parents=True)
    ours = subprocess.Popen([sys.executable, "-c", SLEEP, "sshd-of-the-emulated-pi"])
    # what the old `pkill -f "/usr/sbin/sshd -p 2222 -o ListenAddress=127.0.0.1"` would also have killed
    lookalike = subprocess.Popen(
        [sys.executable, "-c", SLEEP, "/usr/sbin/sshd -p 2222 -o ListenAddress=127.0.0.1"]
    )
    try:
        (run / "lit_nas_sshd.pid").write_text(f"{ours.pid}\n")
        out = subprocess.run(["bash", str(SCRIPT), "--stop", str(tmp_path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert ours.wait(timeout=10) != 0  # terminated by the signal
        assert lookalike.poll() is None
        assert not (run / "lit_nas_sshd.pid").exists()
        # a stale PID file naming a process that is not an sshd is ignored
        (run / "lit_nas_sshd.pid").write_text(f"{lookalike.pid}\n")
        stale = subprocess.Popen([sys.executable, "-c", SLEEP])
        (run / "lit_nas_sshd.pid").write_text(f"{stale.pid}\n")
        subprocess.run(["bash", str(SCRIPT), "--stop", str(tmp_path)], check=True)
        assert stale.poll() is None
        stale.kill()
    finally:
        for p in (ours, lookalike):
            if p.poll() is None:
                p.kill()

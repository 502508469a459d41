"""Child processes the tests start (servers, scripts): stopping them so none outlives its test."""

import subprocess


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate `proc` and wait for it; kill it if it is still running after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

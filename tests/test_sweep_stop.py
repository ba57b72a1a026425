"""A parallel sweep stops as a whole: a signal to `p2p sweep --processes 2` reaches both processes, the command waits
for them, keeps the folder's lock until then and exits 143 (SIGTERM) or 130 (Ctrl-C); nothing writes to the folder
after it has returned, no process of it is left, and a second sweep can then take the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prompt2prompt.sweep import CASES, locked

STUDY = {"model": "shapes", "generation": {"steps": 8},
         "edits": [{"source": "a red circle and a blue square", "target": "a red circle and a blue triangle"}],
         "grid": {"seed": list(range(12))}, "measures": ["drift"]}


def _processes_of(out: Path) -> list[int]:
    """Live processes whose command line names the sweep's folder (the launcher and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(out) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _snapshot(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.mark.once
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
@pytest.mark.parametrize("stop, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_parallel_sweep_leaves_no_process_and_no_writer(tmp_path, stop, code):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    log = (tmp_path / "stderr").open("w")  # a file, not a pipe: reading a pipe would wait for every writer to end
    sweep = subprocess.Popen([sys.executable, "-m", "prompt2prompt.cli", "sweep", str(study), "--out", str(out),
                              "--processes", "2", "--threads", "1", "--quiet"], stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not any((out / CASES).glob("[!.]*/case.json")) and time.time() < deadline:
            assert sweep.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.2)
        assert any((out / CASES).glob("[!.]*/case.json")), "no case finished in 3 minutes"
        sweep.send_signal(stop)
        assert sweep.wait(timeout=120) == code
        left = _processes_of(out)  # at once: neither the launcher nor a worker outlives the command
    finally:
        for pid in _processes_of(out):  # a failing run's processes do not outlive the test
            os.kill(pid, signal.SIGKILL)
        log.close()
    err = (tmp_path / "stderr").read_text()
    assert left == []
    assert "every finished case is kept" in err and "Traceback" not in err.split("p2p sweep:")[-1], err
    before = _snapshot(out)
    time.sleep(3)
    assert _snapshot(out) == before  # nothing writes after the command has returned
    assert not list((out / CASES).glob(".*"))  # no temporary case folder left
    with locked(out):  # the lock went with the command: a second sweep takes the folder
        pass

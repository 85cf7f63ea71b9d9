"""A study stopped with SIGTERM (what `timeout` sends) stops the trainer/evaluator it started, grandchildren
included: on the H200 a killed study once left its trainer running and the next command measured a shared GPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
import sys, signal
from pathlib import Path
sys.path.insert(0, {repo!r})
from experiments_ceiling import _stop_on_sigterm
from metattt.study.runner import _run
_stop_on_sigterm()
child = ("import subprocess, sys, time; "
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
         "open({pidfile!r}, 'w').write(str(g.pid)); time.sleep(120)")
_run(["python", "-c", child], Path("."), Path({log!r}), {{}})
'''


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_stops_the_child_and_its_children(tmp_path) -> None:
    (tmp_path / "experiments_ceiling.py").write_text((REPO / "experiments" / "ceiling.py").read_text())
    pidfile = tmp_path / "grandchild.pid"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO), pidfile=str(pidfile), log=str(tmp_path / "run.log")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    drv = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path)
    t0 = time.time()
    while not (pidfile.is_file() and pidfile.read_text().strip()):
        assert time.time() - t0 < 60 and drv.poll() is None, "the driver never started its child"
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    os.kill(grandchild, 0)  # alive
    drv.send_signal(signal.SIGTERM)
    assert drv.wait(timeout=30) == 128 + signal.SIGTERM
    t0 = time.time()
    while time.time() - t0 < 15:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(grandchild, signal.SIGKILL)
    pytest.fail("the grandchild survived the study's SIGTERM")

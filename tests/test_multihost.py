"""Two processes on localhost (CPU collectives over gloo), each with 2 CPU devices, train,
checkpoint and resume; the result matches one process with 4 devices."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import free_port, process_env

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"


def test_two_processes_match_one_process(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "multi"), str(tmp_path / "multi.npz"), str(REPO)],
        env=process_env(2, TF_CPP_MIN_LOG_LEVEL="3", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "single"), str(tmp_path / "single.npz"), str(REPO)],
        env=process_env(4, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=600)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    report = "\n".join(f"--- process {i} (exit {p.returncode}):\n{out[-2500:]}"
                       for i, (p, out) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    assert single.returncode == 0, single.stderr[-3000:]
    assert "process 1 of 2 with 2 local devices finished at step 6" in "".join(outputs)
    assert "resuming from step 3" in outputs[0]
    multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert sorted(multi.files) == sorted(one.files)
    for key in one.files:
        np.testing.assert_allclose(multi[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)

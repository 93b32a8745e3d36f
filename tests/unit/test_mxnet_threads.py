"""MXNet is given every CPU the process may use (its own default is half of them), unless the
user has said how many threads to use."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, pggeolearn.mxnet; print(os.environ.get('MXNET_OMP_MAX_THREADS'))"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_mxnet_gets_every_cpu_by_default():
    assert _probe() == str(len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "1"}, {"MXNET_OMP_MAX_THREADS": "1"}])
def test_a_thread_count_the_user_set_is_kept(env):
    assert _probe(**env) == ("None" if "OMP_NUM_THREADS" in env else "1")

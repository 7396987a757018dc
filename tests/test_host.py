"""hbpo_jax.host: a launcher re-executes itself once with glibc's huge-page tunable, and keeps a
GLIBC_TUNABLES the user set."""
import os
import platform
import subprocess
import sys

import pytest

from hbpo_jax import host

PROGRAM = ("import os, sys; from hbpo_jax import host; "
           "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); host.use_huge_pages()")


def _run(env):
    done = subprocess.run([sys.executable, "-c", PROGRAM, "--flag=1"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split(" ", 2) for line in done.stdout.splitlines()]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_use_huge_pages_reexecutes_once_with_the_tunable_and_keeps_the_users():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    first, second = _run(env)  # the same PID, the same arguments, now with the tunable; then no more
    assert first == [second[0], "None", "['--flag=1']"]
    assert second == [first[0], host.HUGE_PAGES, "['--flag=1']"]
    assert len(_run(dict(env, GLIBC_TUNABLES=""))) == 1  # the user's (empty) setting is kept

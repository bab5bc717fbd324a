"""The daemon under MemoryDenyWriteExecute=yes: systemd's W^X seccomp filter, rebuilt by
tests/support/wx_filter.py.

systemd is not PID 1 here, so the filter the unit would get is installed by a launcher that then
execs the daemon; the daemon starts, loads the model and answers over the real broker.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support.daemon import REPO, DaemonFactory
from tests.support.mqtt_client import TestClient, assert_well_formed

UNDER_FILTER = [sys.executable, "-m", "tests.support.wx_filter", "--"]

# Each line prints one outcome; run under the filter, it shows which mappings are refused.
PROBE = textwrap.dedent(
    """
    import ctypes, mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.shmat.restype = ctypes.c_void_p
    R, W, X = mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC
    ANON_PRIVATE = mmap.MAP_ANONYMOUS | mmap.MAP_PRIVATE

    def outcome(ok):
        return "allowed" if ok else f"errno {ctypes.get_errno()}"

    page = libc.mmap(None, 4096, R | W, ANON_PRIVATE, -1, 0)
    print("mmap rw:", outcome(page != ctypes.c_void_p(-1).value))
    wx = libc.mmap(None, 4096, R | W | X, ANON_PRIVATE, -1, 0)
    print("mmap rwx:", outcome(wx != ctypes.c_void_p(-1).value))
    print("mprotect rx:", outcome(libc.mprotect(page, 4096, R | X) == 0))
    print("mprotect r:", outcome(libc.mprotect(page, 4096, R) == 0))
    segment = libc.shmget(0, 4096, 0o600)  # IPC_PRIVATE
    print("shmat exec:", outcome(libc.shmat(segment, None, 0o100000) != ctypes.c_void_p(-1).value))
    libc.shmctl(segment, 0, None)  # IPC_RMID
    # A ctypes callback is what llama.cpp's log hook is: libffi must find a way without W+X.
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
    print("callback:", callback(41))
    maps = open("/proc/self/maps").read().splitlines()
    print("wx mappings:", sum(1 for m in maps if "w" in m.split()[1] and "x" in m.split()[1]))
    """
)


def probe(*launcher: str) -> dict[str, str]:
    result = subprocess.run(
        [*launcher, sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_the_filter_refuses_what_systemd_refuses_and_nothing_else() -> None:
    free = probe()
    filtered = probe(*UNDER_FILTER)

    # Without the filter everything is allowed, so the refusals below are the filter's doing.
    assert free["mmap rwx"] == "allowed"
    assert free["mprotect rx"] == "allowed"
    assert free["shmat exec"] == "allowed"
    assert int(free["wx mappings"]) >= 1
    assert filtered["mmap rw"] == "allowed"
    assert filtered["mprotect r"] == "allowed"
    eperm = "1"
    assert filtered["mmap rwx"] == f"errno {eperm}"
    assert filtered["mprotect rx"] == f"errno {eperm}"
    assert filtered["shmat exec"] == f"errno {eperm}"
    assert filtered["callback"] == "42"
    assert filtered["wx mappings"] == "0"


def test_daemon_starts_and_answers_under_the_wx_filter(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    # DEBUG shows llama.cpp's own lines, which arrive through the ctypes log callback.
    daemon = start_daemon({"logging": {"level": "DEBUG"}}, launcher=UNDER_FILTER)

    client.subscribe(daemon.topic("answer/wx"))
    client.publish(
        daemon.topic("ask"),
        {"id": "wx", "question": "Name a colour.", "max_tokens": 8, "temperature": 0},
    )
    done = assert_well_formed(client.stream(daemon.topic("answer/wx")), "wx")

    assert done["type"] == "done"
    assert done["usage"]["completion_tokens"] > 0
    # The log callback is a libffi closure: its lines prove it was made without W+X memory.
    assert "DEBUG llama.cpp: llama_model_loader: " in daemon.log()
    assert daemon.terminate() == 0

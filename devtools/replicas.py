"""``python -m devtools.replicas N <uvicorn arguments>``: N uvicorn processes serving one port, each on a
listening socket of its own (``SO_REUSEPORT``), as production's replicas behind a Service.

uvicorn's ``--workers`` shares one listening socket between its processes, and the process woken first
accepts every connection waiting (uvloop accepts in a loop): a client that opens its few keep-alive
connections at once — the gateway when a batch load starts — sends all of them to one process while the
others idle (measured: one records process at 100 % of a core through a whole batch phase, the other at 0).
With a socket per process the kernel spreads connections over them by a hash of their addresses.

This process only starts the replicas, passes SIGTERM/SIGINT on, stops them all when one stops and exits
then; each replica is its child, so CPU meters and profilers find them as its children.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from types import FrameType

CHILD = "--replica"


def _option(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def replica(args: list[str]) -> None:
    """One uvicorn process, as ``python -m uvicorn ARGS`` would run it, on a socket of its own."""
    import uvicorn

    sock = listening_socket(_option(args, "--host", "127.0.0.1"), int(_option(args, "--port", "8000")))
    run = uvicorn.Server.run

    def on_own_socket(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        run(self, sockets=[sock])

    uvicorn.Server.run = on_own_socket  # type: ignore[method-assign]
    uvicorn.main.main(args=args, prog_name="uvicorn")


def main(argv: list[str]) -> int:
    if argv and argv[0] == CHILD:
        replica(argv[1:])
        return 0
    count, args = int(argv[0]), argv[1:]
    children = [subprocess.Popen([sys.executable, "-m", "devtools.replicas", CHILD, *args]) for _ in range(count)]

    def forward(signum: int, _: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    forward(signal.SIGTERM, None)  # the first replica to stop (a crash, a signal) stops the others
    # uvicorn ends a graceful stop by raising the signal it caught again: that is a clean exit too.
    clean = {0, -signal.SIGTERM, -signal.SIGINT}
    codes = [child.wait() for child in children]
    return next((abs(code) for code in codes if code not in clean), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

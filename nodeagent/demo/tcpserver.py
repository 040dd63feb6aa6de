"""The demo's tiny TCP service: ``python -m nodeagent.demo.tcpserver NAME PORT...`` listens on
every PORT (all addresses) and greets each connection with one line, then closes it.

Owns nothing else; prints ``listening`` once every port is bound, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys


async def serve(name: str, ports: list[int]) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        writer.write(f"hello from {name}, port {port}\n".encode())
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()

    servers = [await asyncio.start_server(greet, "0.0.0.0", p) for p in ports]
    print(f"listening on port(s) {', '.join(map(str, ports))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m nodeagent.demo.tcpserver NAME PORT...", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(argv[0], [int(a) for a in argv[1:]]))
    except OSError as e:
        print(f"tcpserver: cannot listen: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

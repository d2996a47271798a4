#!/usr/bin/env python3
"""A TCP relay in front of one backend whose added latency can be switched on and off:
the "delay on the backend link" of tests/soak.sh.

    relay.py LISTEN_PORT TARGET_PORT CONTROL_FILE

Listens on 127.0.0.1:LISTEN_PORT (0 picks a free port), prints exactly one line
`listening on 127.0.0.1:PORT` once it accepts, and joins every accepted connection to a
new connection to 127.0.0.1:TARGET_PORT. CONTROL_FILE holds the delay in milliseconds
(a whole number; missing, empty or 0: none); it is read again every 100 ms, so the driver
switches the delay by rewriting it. Every read, each way, is held until `delay` after it
arrived before it is written on; bytes keep their order, and an end of stream (FIN) is
passed on after the same delay. A reset or error on either side resets both. Each
direction queues at most 32 reads (backpressure), so memory stays bounded.

Loopback only. Ends with the process that started it (PR_SET_PDEATHSIG, set by the
driver), or on SIGTERM/SIGINT.
"""

import asyncio
import os
import signal
import socket
import struct
import sys

CHUNK = 65536
QUEUE = 32


class State:
    delay = 0.0  # seconds


def read_delay(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return max(0, int(text or "0")) / 1000.0
    except (OSError, ValueError):
        return 0.0


async def watch(path, state):
    while True:
        state.delay = read_delay(path)
        await asyncio.sleep(0.1)


def reset(writer):
    """Close with RST (SO_LINGER 0), as a reset is passed on."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


async def direction(reader, writer, state, failed):
    """Relay one direction; returns normally after passing on an end of stream,
    sets `failed` on any error."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(QUEUE)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((loop.time() + state.delay, data))
                if not data:
                    return
        except (OSError, asyncio.IncompleteReadError):
            await queue.put((0.0, None))

    task = asyncio.create_task(read_side())
    try:
        while True:
            due, data = await queue.get()
            if data is None:
                failed.set()
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except OSError:
        failed.set()
    finally:
        task.cancel()


async def handle(client_r, client_w, target_port, state):
    try:
        backend_r, backend_w = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        reset(client_w)
        return
    failed = asyncio.Event()
    up = asyncio.create_task(direction(client_r, backend_w, state, failed))
    down = asyncio.create_task(direction(backend_r, client_w, state, failed))
    fail = asyncio.create_task(failed.wait())
    pending = {up, down}
    try:
        while pending and not failed.is_set():
            done, _ = await asyncio.wait(pending | {fail}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
    finally:
        for t in (up, down, fail):
            t.cancel()
        if failed.is_set():
            reset(client_w)
            reset(backend_w)
        else:
            client_w.close()
            backend_w.close()


async def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    listen, target, control = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    state = State()
    state.delay = read_delay(control)
    asyncio.create_task(watch(control, state))
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target, state), "127.0.0.1", listen,
        reuse_address=True, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())

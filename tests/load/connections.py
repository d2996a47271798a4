#!/usr/bin/env python3
"""Holds many keep-alive client connections open through a proxy and keeps some busy.

    connections.py --port PORT --pid PID [--conns 10000] [--active 1000] [--seconds 5]

Opens --conns connections to 127.0.0.1:PORT, sends one GET on each (in waves of --active,
so the proxy's backend connections stay near --active), then, with every connection still
open, keeps --active of them busy (one request at a time each, keep-alive) for --seconds
while the rest stay idle; last, one more request on every connection shows none was
dropped. Reads the proxy's VmRSS/VmHWM (KiB, /proc/PID/status) after the opening (all
connections idle) and at the end. Prints one JSON line. Bounded: every wait has a deadline.
"""
import argparse, json, resource, selectors, socket, sys, time

REQ = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n"


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


class Conn:
    __slots__ = ("sock", "buf", "need", "busy")

    def __init__(self, sock):
        self.sock, self.buf, self.need, self.busy = sock, b"", None, False


def response_done(c):
    """Whether c.buf holds a whole response (Content-Length framing); consumes it."""
    if c.need is None:
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = c.buf[:end].decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip() == "content-length":
                length = int(value.strip())
        c.need = end + 4 + length
    if len(c.buf) < c.need:
        return None
    status = c.buf[9:12]
    c.buf, c.need = c.buf[c.need:], None
    return status == b"200"


def run_requests(conns, sel, deadline, until_count=None, repeat=False, stop_at=None):
    """Sends one request on each conn (again and again while repeat, until stop_at);
    returns (ok, failed)."""
    ok = failed = 0
    for c in conns:
        c.sock.sendall(REQ)
        c.busy = True
        sel.register(c.sock, selectors.EVENT_READ, c)
    pending = len(conns)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                failed += 1
                pending -= 1
                sel.unregister(c.sock)
                continue
            c.buf += data
            done = response_done(c)
            if done is None:
                continue
            ok += done
            failed += not done
            if repeat and time.monotonic() < stop_at:
                c.sock.sendall(REQ)
            else:
                pending -= 1
                sel.unregister(c.sock)
    for c in conns:
        try:
            sel.unregister(c.sock)
            failed += 1  # still waiting at the deadline
        except (KeyError, ValueError):
            pass
    return ok, failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--active", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.conns + 100 > hard:
        sys.exit(f"--conns {a.conns} needs more than the fd limit {hard}")
    sel = selectors.DefaultSelector()
    conns, ok, failed = [], 0, 0
    start = time.monotonic()
    for i in range(0, a.conns, a.active):
        wave = []
        for _ in range(min(a.active, a.conns - i)):
            s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            s.setblocking(False)
            wave.append(Conn(s))
        o, f = run_requests(wave, sel, time.monotonic() + 60)
        ok, failed = ok + o, failed + f
        conns += wave
        print(f"opened {len(conns)}: {ok} ok, {failed} failed, {time.monotonic() - start:.1f} s",
              file=sys.stderr, flush=True)
    opened = time.monotonic() - start
    time.sleep(1)
    idle = status(a.pid)
    t0 = time.monotonic()
    o, f = run_requests(conns[: a.active], sel, t0 + a.seconds + 30, repeat=True,
                        stop_at=t0 + a.seconds)
    busy_s = time.monotonic() - t0
    print(f"busy: {o} ok, {f} failed in {busy_s:.1f} s", file=sys.stderr, flush=True)
    end = status(a.pid)
    o2, f2 = run_requests(conns, sel, time.monotonic() + 60)
    print(json.dumps({
        "conns": a.conns, "open_s": round(opened, 2),
        "first_ok": ok, "first_failed": failed,
        "idle_rss_kib": idle["VmRSS"], "busy_ok": o, "busy_failed": f,
        "busy_req_s": round(o / busy_s), "last_ok": o2, "last_failed": f2,
        "rss_kib": end["VmRSS"], "peak_rss_kib": end["VmHWM"],
    }))


main()

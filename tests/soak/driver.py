#!/usr/bin/env python3
"""The soak run of one lb build (started by tests/soak.sh, which documents the bounds).

    driver.py --build NAME --lb BIN --mock BIN --minutes M --out DIR [--workers N] [--seed S]

Starts three mock inference engines (`mock-backend --engine`), each behind its own delay
relay (relay.py, the backend link), and lb in front of the three relays. Then, all within
M minutes:

1. warm-up (15% of the run, 10 to 30 s): traffic only;
2. quiet: the clients close their connections, `active_conns` must reach 0, then 5 s for
   lb's idle backend connections to close; lb's fds and RSS are the start values;
3. main phase: traffic, while a chaos task SIGKILLs a random backend (its engine and its
   relay, as when the machine dies) and restarts it on the same ports a few seconds later,
   at most one down at a time, and a delay task switches a delay on the link of one or all
   backends on and off;
4. quiet again: `active_conns` must reach 0 within 10 s; after 5 s more the end values.

Traffic: N workers, each looping over a weighted mix: chat completions through the OpenAI
Python SDK (`max_retries=0`), streamed or not, some streams abandoned by the client after a
few chunks; streamed legacy completions; uploads of 100 to 600 KiB to the mock's `/upload`
(Content-Length or chunked; the answer's FNV-1a hash is checked), some abandoned mid-body;
WebSocket echo round trips on `/ws`, some dropped without a close handshake. Every answer
is checked (status, token count, hash, echo).

Fault windows: a kill window lasts from the kill until lb's `/health` counts every backend
healthy again after the restart; a delay window from switching the delay on to switching
it off. A failed operation (a 5xx, or a client error: exception, timeout, wrong answer)
is inside a window when its [start, end] overlaps [window start, window end + GRACE]
(the health interval + 1 s); since overlap is judged on the whole operation, one that
started under a delay and ended after it is inside.

Prints progress lines, then the summary line
`soak BUILD: N requests (...), 5xx outside X, client errors outside Y, kills K, delay
windows D, fds A->B, rss R1->R2 MiB, active Z: PASS` (or `FAIL (reasons)`), and exits 1 on
FAIL. Details (every failed operation, the windows) go to OUT/report.json, lb's output to
OUT/lb.log.
"""

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(var, None)

import httpx  # noqa: E402
import openai  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HEALTH_INTERVAL = 5          # lb --health-check-interval (the minimum lb accepts)
GRACE = HEALTH_INTERVAL + 1  # after a window ends, failures still count as inside
OP_TIMEOUT = 45.0            # client deadline of one operation
BACK_TIMEOUT = 30.0          # a restarted backend must be healthy in lb again by then
ACTIVE_WAIT = 10.0           # active_conns must reach 0 this soon after traffic stops
SETTLE = 5.0                 # then this long (lb closes idle backend connections at 4 s)
FD_SLACK = 4                 # bound: fds end <= start + FD_SLACK
RSS_FACTOR, RSS_SLACK_MIB = 1.5, 8.0  # bound: rss end <= start * FACTOR + SLACK
MODEL = "mock-model"

# Weighted mix of operations.
MIX = [
    ("chat", 30), ("stream", 28), ("stream_abort", 10), ("completion_stream", 5),
    ("upload", 12), ("upload_abort", 3), ("ws", 9), ("ws_abort", 3),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant. " * 20,
    "You are a terse code reviewer; answer in one line. " * 12,
    "Translate the user's text to French and explain nothing. " * 8,
]


def log(msg):
    print(msg, flush=True)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def die_with_parent():
    """Children get SIGKILL when the driver dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def spawn_listening(cmd, logfile, what):
    """Start a child that prints `listening on 127.0.0.1:PORT` first; returns (proc, port)."""
    err = open(logfile, "ab")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent)
    err.close()
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
    except asyncio.TimeoutError:
        line = b""
    text = line.decode(errors="replace").strip()
    if not text.startswith("listening on "):
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"{what} did not start ({' '.join(cmd)}): {text or 'no output'}; see {logfile}")
    return proc, int(text.rsplit(":", 1)[1])


class Backend:
    def __init__(self, idx, mock, out):
        self.idx, self.mock, self.out = idx, mock, out
        self.mock_port = 0
        self.relay_port = 0
        self.control = os.path.join(out, f"delay-{idx}")
        with open(self.control, "w") as f:
            f.write("0")
        self.mock_proc = self.relay_proc = None

    async def start(self):
        for attempt in range(20):
            try:
                self.mock_proc, port = await spawn_listening(
                    [self.mock, "--port", str(self.mock_port), "--engine", "--speed", "2"],
                    os.path.join(self.out, f"mock-{self.idx}.log"), f"mock backend {self.idx}")
                self.mock_port = port
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)  # the port may still be held briefly after a kill
        for attempt in range(20):
            try:
                self.relay_proc, port = await spawn_listening(
                    [sys.executable, os.path.join(HERE, "relay.py"), str(self.relay_port),
                     str(self.mock_port), self.control],
                    os.path.join(self.out, f"relay-{self.idx}.log"), f"relay {self.idx}")
                self.relay_port = port
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)

    async def kill(self):
        for p in (self.relay_proc, self.mock_proc):
            if p is not None and p.returncode is None:
                p.kill()
        for p in (self.relay_proc, self.mock_proc):
            if p is not None:
                await p.wait()

    def set_delay(self, ms):
        tmp = self.control + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(ms))
        os.replace(tmp, self.control)

    async def stats(self):
        """The engine's own /stats, straight to the engine (not through the relay)."""
        st, body = await http_get(self.mock_port, "/stats")
        return json.loads(body) if st == 200 else None


async def http_get(port, path, timeout=3.0):
    """One GET on a fresh connection, closed after: (status, body)."""
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            await w.drain()
            data = await r.read()
        finally:
            w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            out, rest = b"", body
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                n = int(size_line.split(b";")[0], 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            body = out
        return status, body.decode(errors="replace")
    return await asyncio.wait_for(go(), timeout)


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class Soak:
    def __init__(self, a):
        self.a = a
        self.build = a.build
        self.rng = random.Random(a.seed)
        self.t0 = time.monotonic()
        self.backends = [Backend(i, a.mock, a.out) for i in range(3)]
        self.lb = None
        self.lb_port = 0
        self.windows = []          # {"kind", "what", "start", "end"}
        self.counts = {k: 0 for k, _ in MIX}
        self.failures = []         # {"kind", "start", "end", "status", "error"}
        self.kills = 0
        self.delays = 0
        self.problems = []         # reasons for FAIL
        self.peak_rss = 0.0
        self.peak_fds = 0
        self.peak_active = 0
        self.stop_chaos = asyncio.Event()
        self.measuring = False
        self.payloads = []

    def now(self):
        return time.monotonic() - self.t0

    # ---- processes -------------------------------------------------------------------

    async def start_lb(self):
        help_text = subprocess.run([self.a.lb, "--help"], capture_output=True, text=True).stdout
        extra = ["--admin-bind", "off"] if "--admin-bind" in help_text else []
        urls = [f"http://127.0.0.1:{b.relay_port}" for b in self.backends]
        for attempt in range(5):
            self.lb_port = free_port()
            cmd = [self.a.lb, "--backends", *urls, "--port", str(self.lb_port),
                   "--bind", "127.0.0.1", "--health-check-interval", f"{HEALTH_INTERVAL}s",
                   "--connect-retries", "2", *extra]
            logf = open(os.path.join(self.a.out, "lb.log"), "ab")
            logf.write(("\n$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            self.lb = await asyncio.create_subprocess_exec(
                *cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
            logf.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.lb.returncode is None:
                try:
                    st, body = await http_get(self.lb_port, "/health")
                    if st == 200 and json.loads(body).get("healthy_backends") == 3:
                        return
                except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                    pass
                await asyncio.sleep(0.2)
            if self.lb.returncode is None:
                self.lb.kill()
            await self.lb.wait()
        raise RuntimeError(f"lb did not start with 3 healthy backends; see {self.a.out}/lb.log")

    async def health(self):
        st, body = await http_get(self.lb_port, "/health")
        return st, json.loads(body)

    def lb_alive(self):
        return self.lb is not None and self.lb.returncode is None

    # ---- traffic ---------------------------------------------------------------------

    def make_payloads(self):
        for _ in range(6):
            n = self.rng.randint(100, 600) * 1024
            data = self.rng.randbytes(n)
            self.payloads.append((data, fnv1a64(data)))

    def messages(self, rng):
        user = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kv", "cache", "token"])
                        for _ in range(rng.randint(3, 300)))
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                {"role": "user", "content": user}]

    async def op_chat(self, c, rng):
        n = rng.randint(4, 24)
        r = await c["oai"].chat.completions.create(model=MODEL, messages=self.messages(rng),
                                                  max_tokens=n)
        want = " ".join(f"token{i}" for i in range(n))
        if r.choices[0].message.content != want or r.usage.completion_tokens != n:
            raise AssertionError(f"chat answer {r.choices[0].message.content!r:.60} "
                                 f"usage {r.usage.completion_tokens}, wanted {n} tokens")

    async def op_stream(self, c, rng):
        n = rng.randint(8, 40)
        s = await c["oai"].chat.completions.create(
            model=MODEL, messages=self.messages(rng), max_tokens=n, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        want = " ".join(f"token{i}" for i in range(n))
        if text != want or usage != n:
            raise AssertionError(f"stream ended with {len(text.split())} of {n} tokens, usage {usage}")

    async def op_stream_abort(self, c, rng):
        n = rng.randint(30, 60)
        s = await c["oai"].chat.completions.create(
            model=MODEL, messages=self.messages(rng), max_tokens=n, stream=True)
        keep = rng.randint(1, 5)
        got = 0
        async for _ in s:
            got += 1
            if got >= keep:
                break
        await s.close()
        if got < keep:
            raise AssertionError(f"stream ended after {got} chunks, before the client left at {keep}")

    async def op_completion_stream(self, c, rng):
        n = rng.randint(4, 20)
        s = await c["oai"].completions.create(
            model=MODEL, prompt=rng.choice(SYSTEM_PROMPTS) + str(rng.random()), max_tokens=n,
            stream=True)
        text = ""
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].text or ""
        if text != " ".join(f"token{i}" for i in range(n)):
            raise AssertionError(f"completion stream ended with {len(text.split())} of {n} tokens")

    async def op_upload(self, c, rng, abort=False):
        data, digest = rng.choice(self.payloads)
        url = f"http://127.0.0.1:{self.lb_port}/upload"
        if abort:
            class Gone(Exception):
                pass
            cut = rng.randint(1, len(data) - 1)

            async def body():
                yield data[:cut // 2]
                await asyncio.sleep(rng.uniform(0, 0.2))
                yield data[cut // 2:cut]
                raise Gone()
            try:
                r = await c["http"].post(url, content=body())
            except Gone:
                return
            except httpx.HTTPError as e:
                if isinstance(e.__cause__, Gone) or isinstance(e.__context__, Gone):
                    return
                raise
            raise AssertionError(f"upload cut by the client got an answer: {r.status_code}")
        if rng.random() < 0.5:
            content = data
        else:
            async def chunks():
                for i in range(0, len(data), 64 * 1024):
                    yield data[i:i + 64 * 1024]
            content = chunks()
        r = await c["http"].post(url, content=content)
        if r.status_code != 200:
            raise StatusError(r.status_code, r.text[:200])
        j = r.json()
        if j.get("bytes") != len(data) or j.get("fnv1a") != digest:
            raise AssertionError(f"upload of {len(data)} bytes answered {j}")

    async def op_ws(self, c, rng, abort=False):
        url = f"ws://127.0.0.1:{self.lb_port}/ws"
        ws = await ws_connect(url, proxy=None, open_timeout=15, close_timeout=5,
                              max_size=2 ** 20, compression=None)
        aborted = False
        try:
            for i in range(rng.randint(1, 3) if abort else rng.randint(3, 10)):
                if rng.random() < 0.5:
                    msg = "".join(rng.choice("abcdef ") for _ in range(rng.randint(1, 2000)))
                else:
                    msg = rng.randbytes(rng.randint(1, 16384))
                await ws.send(msg)
                back = await ws.recv()
                if back != msg:
                    raise AssertionError(f"websocket echo differs ({len(back)} vs {len(msg)} bytes)")
            if abort:
                aborted = True
                ws.transport.abort()
        finally:
            if not aborted:
                await ws.close()

    async def run_op(self, kind, c, rng):
        start = self.now()
        status, err = None, None
        try:
            if kind == "chat":
                coro = self.op_chat(c, rng)
            elif kind == "stream":
                coro = self.op_stream(c, rng)
            elif kind == "stream_abort":
                coro = self.op_stream_abort(c, rng)
            elif kind == "completion_stream":
                coro = self.op_completion_stream(c, rng)
            elif kind == "upload":
                coro = self.op_upload(c, rng)
            elif kind == "upload_abort":
                coro = self.op_upload(c, rng, abort=True)
            elif kind == "ws":
                coro = self.op_ws(c, rng)
            else:
                coro = self.op_ws(c, rng, abort=True)
            await asyncio.wait_for(coro, OP_TIMEOUT)
        except openai.APIStatusError as e:
            status, err = e.status_code, f"{type(e).__name__}: {str(e)[:200]}"
        except StatusError as e:
            status, err = e.status, f"status {e.status}: {e.body}"
        except InvalidStatus as e:
            status, err = e.response.status_code, f"websocket handshake: {e}"
        except asyncio.TimeoutError:
            err = f"no end within {OP_TIMEOUT:.0f} s"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every other failure is a client error
            cause = e.__cause__ or e.__context__
            err = f"{type(e).__name__}: {str(e)[:200]}" + (
                f" (from {type(cause).__name__}: {str(cause)[:120]})" if cause else "")
        end = self.now()
        self.counts[kind] += 1
        if err is not None:
            self.failures.append({"kind": kind, "start": round(start, 3), "end": round(end, 3),
                                  "status": status, "error": err})

    async def worker(self, wid, until):
        rng = random.Random(self.rng.random())
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        c = {"oai": AsyncOpenAI(base_url=f"http://127.0.0.1:{self.lb_port}/v1", api_key="x",
                                max_retries=0, timeout=OP_TIMEOUT),
             "http": httpx.AsyncClient(timeout=OP_TIMEOUT, trust_env=False)}
        try:
            for _ in range(int((until - self.now()) * 100) + 1):  # a bound on the count too
                if self.now() >= until or not self.lb_alive():
                    break
                await self.run_op(rng.choices(kinds, weights)[0], c, rng)
                await asyncio.sleep(rng.uniform(0, 0.1))
        finally:
            await c["oai"].close()
            await c["http"].aclose()

    async def traffic(self, until):
        await asyncio.gather(*(self.worker(i, until) for i in range(self.a.workers)))

    # ---- faults ----------------------------------------------------------------------

    async def wait_all_healthy(self, limit):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                _, h = await self.health()
                if h.get("healthy_backends") == 3:
                    return True
            except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.25)
        return False

    async def sleep_or_stop(self, seconds):
        try:
            await asyncio.wait_for(self.stop_chaos.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def chaos(self, last_kill):
        """Kill a random backend every 8 to 20 s, restart it after 2 to 5 s, wait until lb
        has it back; at most one down at a time. Bounded by count and time."""
        max_kills = int((last_kill - self.now()) / 8) + 1
        while self.kills < max_kills:
            if await self.sleep_or_stop(self.rng.uniform(8, 20)) or self.now() > last_kill:
                return
            b = self.rng.choice(self.backends)
            w = {"kind": "kill", "what": f"backend {b.idx}", "start": round(self.now(), 3), "end": None}
            self.windows.append(w)
            await b.kill()
            self.kills += 1
            await asyncio.sleep(self.rng.uniform(2, 5))
            try:
                await b.start()
            except RuntimeError as e:
                self.problems.append(f"backend {b.idx} did not restart: {e}")
                w["end"] = round(self.now(), 3)
                return
            back = await self.wait_all_healthy(BACK_TIMEOUT)
            w["end"] = round(self.now(), 3)
            if not back:
                self.problems.append(f"backend {b.idx} not healthy in lb {BACK_TIMEOUT:.0f} s "
                                     f"after its restart at {w['end']:.1f} s")
                return

    async def delay_windows(self, last_on):
        """Switch a delay (100 to 500 ms each way) on the link of one or all backends for
        3 to 8 s, every 10 to 25 s. Bounded by count and time."""
        max_windows = int((last_on - self.now()) / 10) + 1
        while self.delays < max_windows:
            if await self.sleep_or_stop(self.rng.uniform(10, 25)) or self.now() > last_on:
                return
            ms = self.rng.choice([100, 250, 500])
            targets = self.backends if self.rng.random() < 0.3 else [self.rng.choice(self.backends)]
            what = "all backends" if len(targets) == 3 else f"backend {targets[0].idx}"
            w = {"kind": "delay", "what": f"{ms} ms on {what}", "start": round(self.now(), 3), "end": None}
            self.windows.append(w)
            self.delays += 1
            for b in targets:
                b.set_delay(ms)
            await asyncio.sleep(self.rng.uniform(3, 8))
            for b in targets:
                b.set_delay(0)
            w["end"] = round(self.now() + 0.2, 3)  # the relays read the file every 100 ms

    # ---- watching lb -----------------------------------------------------------------

    async def monitor(self, stop):
        last_report = self.now()
        for _ in range(int(self.a.minutes * 60 * 20) + 6000):  # ~1 s a round; a bound on the count
            if stop.is_set():
                return
            if not self.lb_alive():
                return
            if self.measuring:
                await asyncio.sleep(0.1)
                continue
            try:
                pid = self.lb.pid
                self.peak_rss = max(self.peak_rss, proc_rss_mib(pid))
                self.peak_fds = max(self.peak_fds, proc_fds(pid))
                _, h = await self.health()
                self.peak_active = max(self.peak_active, h.get("active_conns", 0))
            except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                pass
            if self.now() - last_report >= 60:
                last_report = self.now()
                inside, outside = self.split()
                log(f"[soak {self.build}] {self.now() / 60:.1f} min: {sum(self.counts.values())} requests, "
                    f"kills {self.kills}, delay windows {self.delays}, failures inside/outside "
                    f"{len(inside)}/{len(outside)}, peak rss {self.peak_rss:.1f} MiB, peak fds {self.peak_fds}")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def quiet_measure(self, label):
        """Traffic has stopped and the clients closed: wait for active_conns 0, settle,
        and return (fds, rss MiB, active)."""
        self.measuring = True  # the monitor's own /health connections stay out of the count
        deadline = time.monotonic() + ACTIVE_WAIT
        active = None
        while time.monotonic() < deadline:
            try:
                _, h = await self.health()
                active = h.get("active_conns")
                if active == 0:
                    break
            except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.2)
        if active != 0:
            self.problems.append(f"active_conns {active} at {label}, {ACTIVE_WAIT:.0f} s after traffic stopped")
        await asyncio.sleep(SETTLE)
        try:
            _, h = await self.health()
            active = h.get("active_conns")
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
            self.problems.append(f"/health failed at {label}: {e!r}")
        if not self.lb_alive():
            raise LbDied()
        await asyncio.sleep(0.5)  # lb closes its end of our last /health connection
        fds, rss = proc_fds(self.lb.pid), proc_rss_mib(self.lb.pid)
        self.measuring = False
        return fds, rss, active

    def split(self):
        inside, outside = [], []
        for f in self.failures:
            hits = [w for w in self.windows
                    if f["start"] <= (w["end"] if w["end"] is not None else float("inf")) + GRACE
                    and f["end"] >= w["start"]]
            # named after the overlapping window that began last before the failure ended
            hit = max(hits, key=lambda w: (w["start"] <= f["end"], -abs(f["end"] - w["start"])),
                      default=None)
            (inside if hit else outside).append(dict(f, window=hit and f"{hit['kind']} {hit['what']}"))
        return inside, outside

    # ---- the run ---------------------------------------------------------------------

    async def run(self):
        total = self.a.minutes * 60
        warm = min(30.0, max(10.0, 0.15 * total))
        log(f"[soak {self.build}] {self.a.minutes:g} min, {self.a.workers} workers, seed {self.a.seed}, "
            f"out {self.a.out}")
        self.make_payloads()
        for b in self.backends:
            await b.start()
        await self.start_lb()
        log(f"[soak {self.build}] lb pid {self.lb.pid} on 127.0.0.1:{self.lb_port}, backends via relays "
            + ", ".join(f"{b.relay_port}->{b.mock_port}" for b in self.backends))
        stop_mon = asyncio.Event()
        mon = asyncio.create_task(self.monitor(stop_mon))
        fds0 = rss0 = fds1 = rss1 = active1 = None
        try:
            await self.traffic(self.now() + warm)
            fds0, rss0, _ = await self.quiet_measure("the end of the warm-up")
            log(f"[soak {self.build}] after warm-up: fds {fds0}, rss {rss0:.1f} MiB")
            # leave time for the final quiet phase within the run's minutes
            main_end = max(total - (ACTIVE_WAIT / 2 + SETTLE + 2), self.now() + 20)
            chaos = asyncio.create_task(self.chaos(main_end - 18))
            delay = asyncio.create_task(self.delay_windows(main_end - 10))
            await self.traffic(main_end)
            self.stop_chaos.set()
            await asyncio.gather(chaos, delay)
            if not self.lb_alive():
                raise LbDied()
            if not await self.wait_all_healthy(BACK_TIMEOUT):
                self.problems.append("not every backend healthy in lb at the end")
            fds1, rss1, active1 = await self.quiet_measure("the end")
            for b in self.backends:
                try:
                    st = await b.stats()
                    if st and st.get("in_flight", 0) != 0:
                        self.problems.append(f"backend {b.idx} still has {st['in_flight']} requests "
                                             f"in flight after the end")
                except (OSError, asyncio.TimeoutError, ValueError) as e:
                    self.problems.append(f"backend {b.idx} /stats failed: {e!r}")
        except LbDied:
            self.problems.append(f"lb exited during the run with status {self.lb.returncode}")
        finally:
            self.stop_chaos.set()
            stop_mon.set()
            await mon
        # a graceful stop must still work after all that
        if self.lb_alive():
            self.lb.send_signal(signal.SIGTERM)
            try:
                rc = await asyncio.wait_for(self.lb.wait(), 15)
                if rc != 0:
                    self.problems.append(f"lb exited {rc} on SIGTERM")
            except asyncio.TimeoutError:
                self.problems.append("lb still running 15 s after SIGTERM")
                self.lb.kill()
                await self.lb.wait()
        for b in self.backends:
            await b.kill()
        with open(os.path.join(self.a.out, "lb.log"), errors="replace") as f:
            lb_log = f.read()
        if "panicked" in lb_log:
            self.problems.append("lb panicked (see lb.log)")
        return self.verdict(fds0, rss0, fds1, rss1, active1)

    def verdict(self, fds0, rss0, fds1, rss1, active1):
        inside, outside = self.split()
        five_out = [f for f in outside if f["status"] is not None and f["status"] >= 500]
        other_out = [f for f in outside if not (f["status"] is not None and f["status"] >= 500)]
        n = sum(self.counts.values())
        streams = self.counts["stream"] + self.counts["completion_stream"]
        uploads = self.counts["upload"]
        websockets = self.counts["ws"]
        aborts = self.counts["stream_abort"] + self.counts["upload_abort"] + self.counts["ws_abort"]
        problems = list(self.problems)
        if five_out:
            problems.append(f"{len(five_out)} 5xx outside the fault windows")
        if other_out:
            problems.append(f"{len(other_out)} client errors outside the fault windows")
        if fds0 is not None and fds1 is not None and fds1 > fds0 + FD_SLACK:
            problems.append(f"fds grew {fds0}->{fds1} (bound: start + {FD_SLACK})")
        if rss0 is not None and rss1 is not None and rss1 > rss0 * RSS_FACTOR + RSS_SLACK_MIB:
            problems.append(f"rss grew {rss0:.1f}->{rss1:.1f} MiB (bound: start x {RSS_FACTOR} + {RSS_SLACK_MIB:g} MiB)")
        if active1 not in (0, None):
            problems.append(f"active_conns {active1} at the end")
        if n < 20 * self.a.minutes:
            problems.append(f"only {n} requests in {self.a.minutes:g} min (traffic stalled?)")
        report = {"build": self.build, "seed": self.a.seed, "counts": self.counts,
                  "kills": self.kills, "delay_windows": self.delays, "grace_s": GRACE,
                  "windows": self.windows, "failures_inside": inside, "failures_outside": outside,
                  "fds": [fds0, fds1], "rss_mib": [rss0, rss1], "peak_rss_mib": self.peak_rss,
                  "peak_fds": self.peak_fds, "peak_active": self.peak_active, "problems": problems}
        with open(os.path.join(self.a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        five_in = sum(1 for f in inside if f["status"] is not None and f["status"] >= 500)
        log(f"[soak {self.build}] inside fault windows: {five_in} 5xx, {len(inside) - five_in} client errors; "
            f"peak rss {self.peak_rss:.1f} MiB, peak fds {self.peak_fds}, peak active {self.peak_active}")
        for f in outside[:10]:
            log(f"[soak {self.build}] outside a window: {f['kind']} {f['start']:.1f}-{f['end']:.1f} s: "
                f"{f['error']}")
        fmt = lambda v, spec: "?" if v is None else format(v, spec)  # noqa: E731
        line = (f"soak {self.build}: {n} requests ({streams} streams, {uploads} uploads, "
                f"{websockets} websockets, {aborts} aborts), 5xx outside {len(five_out)}, "
                f"client errors outside {len(other_out)}, kills {self.kills}, delay windows {self.delays}, "
                f"fds {fmt(fds0, 'd')}->{fmt(fds1, 'd')}, rss {fmt(rss0, '.1f')}->{fmt(rss1, '.1f')} MiB, "
                f"active {fmt(active1, 'd')}: " + ("PASS" if not problems else "FAIL (" + "; ".join(problems) + ")"))
        log(line)
        return 0 if not problems else 1


class StatusError(Exception):
    def __init__(self, status, body):
        super().__init__(f"status {status}")
        self.status, self.body = status, body


class LbDied(Exception):
    pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", required=True)
    p.add_argument("--lb", required=True)
    p.add_argument("--mock", required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(2 ** 32)
    os.makedirs(a.out, exist_ok=True)
    soak = Soak(a)

    async def go():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, task.cancel)
        try:
            return await soak.run()
        except asyncio.CancelledError:
            log(f"soak {a.build}: interrupted: FAIL")
            return 1
        finally:
            if soak.lb is not None and soak.lb.returncode is None:
                soak.lb.kill()
            for b in soak.backends:
                for pr in (b.relay_proc, b.mock_proc):
                    if pr is not None and pr.returncode is None:
                        pr.kill()
    try:
        rc = asyncio.run(go())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        log(f"soak {a.build}: the driver failed (above): FAIL")
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()

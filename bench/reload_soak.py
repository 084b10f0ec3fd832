"""Reload and scaling under load, at scale: how many requests fail while workers come and go.

    python bench/reload_soak.py                 # 65,000 requests, HUP/TTIN/TTOU every ~2 s
    python bench/reload_soak.py --requests 5000 # quicker

Starts `gunicorn -c gunicorn.conf.py` (mock provider, auth on, limits generous) on a free
loopback port, drives it with keep-alive aiohttp clients, and cycles TTIN, TTOU and HUP on the
master while the load runs. Prints requests, non-2xx and connection errors. Loopback only,
bounded by --requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, wait_service  # noqa: E402 - shared with the tests

KEY = "sk-reload-soak"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=65_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--signal-every", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="reload-soak-", suffix=".log", delete=False)  # noqa: SIM115
    env = {
        **os.environ,
        "SERVER_ADDRESS": f"127.0.0.1:{port}",
        "WORKERS": str(args.workers),
        "API_KEYS": KEY,
        "RATE_LIMIT_RPM": "1000000000",
        "RATE_LIMIT_BURST": "1000000000",
        "INSTANCE_NAME": f"soak{port}",
        "LOG_LEVEL": "warning",
    }
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = subprocess.Popen([gunicorn, "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    counts = {"ok": 0, "non_2xx": 0, "errors": 0, "signals": 0}
    errors: dict[str, int] = {}
    try:
        try:  # before any load: blocking here stalls nothing
            wait_service(proc, url + "/health/ready", timeout=30)
        except RuntimeError as exc:
            raise SystemExit(f"gunicorn did not become ready: {exc}") from exc
        remaining = args.requests
        deadline = time.monotonic() + args.max_seconds
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

        async def client() -> None:
            nonlocal remaining
            connector = aiohttp.TCPConnector(limit=1, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as session:
                while remaining > 0 and time.monotonic() < deadline:
                    remaining -= 1
                    try:
                        async with session.post(url + "/v1/chat/completions", data=BODY,
                                                headers=headers) as resp:  # fmt: skip
                            await resp.read()
                            counts["ok" if resp.status == 200 else "non_2xx"] += 1
                    except (aiohttp.ClientError, OSError) as exc:
                        counts["errors"] += 1
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        async def signals() -> None:
            cycle = [signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP]
            index = 0
            while remaining > 0 and time.monotonic() < deadline:
                await asyncio.sleep(args.signal_every)
                proc.send_signal(cycle[index % len(cycle)])
                counts["signals"] += 1
                index += 1

        started = time.monotonic()
        signaller = asyncio.create_task(signals())
        await asyncio.gather(*(client() for _ in range(args.clients)))
        signaller.cancel()
        elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    total = counts["ok"] + counts["non_2xx"] + counts["errors"]
    failed = counts["non_2xx"] + counts["errors"]
    print(f"requests      {total}")
    print(
        f"signals       {counts['signals']} (TTIN, TTOU, HUP in turn, every {args.signal_every}s)"
    )
    print(f"2xx           {counts['ok']}")
    print(f"non-2xx       {counts['non_2xx']}")
    print(f"conn errors   {counts['errors']} {errors or ''}")
    print(f"failure rate  {failed / max(total, 1):.6f} ({failed} in {total}) over {elapsed:.1f}s")
    return 0 if failed * 10_000 < max(total, 1) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

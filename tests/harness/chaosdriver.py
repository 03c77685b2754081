"""A bounded stream of ``openai`` SDK requests, streamed and not, each outcome one JSON line.

    python -m tests.harness.chaosdriver --api http://127.0.0.1:PORT/v1 --out FILE --stop FILE
        --models m-one,m-two [--max-requests N] [--max-s S] [--concurrency C] [--timeout-s T]

Run inside the client's network namespace by ``tests.harness.chaoslab.Lab.driver``.
Workers send requests one after the other (models and streaming alternate) until the
stop file exists, ``--max-requests`` were sent or ``--max-s`` passed.  Each line says:
``kind`` -- ``ok`` (a whole answer: a finish reason), ``error`` (a clean error: an HTTP
status with OpenAI's error body, or an SSE ``error`` event in a stream), ``unclean``
(anything else: a connection cut with no error, a stream that ends without a finish
reason or an error, a body that does not parse) or ``hang`` (no outcome within
``--timeout-s``, the SDK's own timeout) -- with the status, error type and message,
``node`` (``X-Meshd-Node``: who answered), the times (``time.time()``, so the chaos
script can place them among its faults) and the number of chunks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import openai


def one(client: openai.OpenAI, i: int, model: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"i": i, "model": model, "stream": stream, "t0": time.time(),
                           "chunks": 0, "node": None}
    messages: list[Any] = [{"role": "user", "content": f"Request {i}: say hello."}]
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=stream,
            user=f"chaos-{i}")
        rec["node"] = raw.headers.get("x-meshd-node")
        rec["status"] = raw.status_code
        parsed: Any = raw.parse()
        if stream:
            finish = None
            for chunk in parsed:
                if rec["chunks"] == 0:
                    rec["t_first"] = time.time()
                rec["chunks"] += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            rec["kind"] = "ok" if finish else "unclean"
            rec["finish"] = finish
            if not finish:
                rec["message"] = "the stream ended without a finish reason or an error"
        else:
            finish = parsed.choices[0].finish_reason if parsed.choices else None
            rec["kind"] = "ok" if finish else "unclean"
            rec["finish"] = finish
    except openai.APITimeoutError as e:
        rec.update(kind="hang", message=str(e)[:200])
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        clean = isinstance(err, dict) and bool(err.get("message")) and bool(err.get("type"))
        rec.update(kind="error" if clean else "unclean", status=e.status_code,
                   type=err.get("type") if isinstance(err, dict) else None,
                   code=err.get("code") if isinstance(err, dict) else None,
                   message=str(err.get("message") if clean else e)[:200])
    except openai.APIConnectionError as e:
        rec.update(kind="unclean", type="connection", message=repr(e.__cause__ or e)[:200])
    except openai.APIError as e:  # an SSE error event mid-stream: the SDK raises APIError
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        clean = isinstance(err, dict) and bool(err.get("message"))
        rec.update(kind="error" if clean else "unclean", status=rec.get("status"),
                   type=(err.get("type") if isinstance(err, dict) else None) or "stream_error",
                   code=err.get("code") if isinstance(err, dict) else None,
                   message=str(e.message)[:200], midstream=True)
    except Exception as e:  # noqa: BLE001 - a body cut short, JSON that does not parse: unclean
        rec.update(kind="unclean", type=type(e).__name__, message=str(e)[:200])
    rec["t1"] = time.time()
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stop", required=True, type=Path)
    p.add_argument("--models", required=True)
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--max-s", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    models = args.models.split(",")
    client = openai.OpenAI(base_url=args.api, api_key="chaos", max_retries=0,
                           timeout=args.timeout_s)
    counter = itertools.count()
    lock = threading.Lock()
    end = time.monotonic() + args.max_s
    out = args.out.open("a", buffering=1)

    def worker() -> None:
        while time.monotonic() < end and not args.stop.exists():
            i = next(counter)
            if i >= args.max_requests:
                return
            rec = one(client, i, models[i % len(models)], (i // len(models)) % 2 == 1,
                      args.max_tokens)
            with lock:
                out.write(json.dumps(rec) + "\n")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.max_s + args.timeout_s + 30)
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

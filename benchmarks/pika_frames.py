"""pika's own body frames vs ``hecommon.broker.pikaframes``: CPU per MB published and consumed.

    python benchmarks/pika_frames.py [--mib 8] [--messages 30] [--json PATH]

Each mode runs in a fresh process (``pikaframes.install()`` changes pika for the whole process),
both with helora's 1 MiB socket reads: publish ``--messages`` bodies of ``--mib`` MiB with
confirms to a queue of the local broker, then consume them with manual acks. Reported: process
CPU-ms and wall-ms per MB for each side, and the ratios of the two modes (baseline: pika's own).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, write_json  # noqa: E402

URL = os.environ.get("HELORA_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def measure(fast: bool, mib: int, messages: int) -> dict:
    """One mode, in this process: CPU and wall milliseconds per MB published and consumed."""
    import pika
    from hecommon.broker import connection, pikaframes

    connection.tune_pika_reads()
    if fast:
        pikaframes.install()
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.confirm_delivery()
    q = ch.queue_declare(f"helora-bench-frames-{secrets.token_hex(4)}", exclusive=True).method.queue
    body = os.urandom(mib << 20)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(messages):
        ch.basic_publish("", q, body, mandatory=True)
    t1, c1 = time.perf_counter(), time.process_time()
    got = 0
    ch.basic_qos(prefetch_count=4)
    for method, _, data in ch.consume(q, inactivity_timeout=60):
        if method is None:
            raise RuntimeError("the broker stopped delivering")
        if data != body:
            raise RuntimeError("a body arrived changed")
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got == messages:
            break
    t2, c2 = time.perf_counter(), time.process_time()
    conn.close()
    mb = messages * len(body) / 1e6
    return {"publish_cpu_ms_per_mb": 1e3 * (c1 - c0) / mb, "publish_wall_ms_per_mb": 1e3 * (t1 - t0) / mb,
            "consume_cpu_ms_per_mb": 1e3 * (c2 - c1) / mb, "consume_wall_ms_per_mb": 1e3 * (t2 - t1) / mb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=8, help="message body size in MiB")
    p.add_argument("--messages", type=int, default=30)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--child", choices=("pika", "pikaframes"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mib < 1 or args.messages < 1:
        p.error("--mib and --messages must be at least 1")
    if args.child:
        print(json.dumps(measure(args.child == "pikaframes", args.mib, args.messages)))
        return 0
    results = {}
    for mode in ("pika", "pikaframes"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--mib", str(args.mib),
                              "--messages", str(args.messages)], check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [{"mode": m, **r} for m, r in results.items()]
    rows.append({"mode": "ratio", **{k: results["pikaframes"][k] / results["pika"][k] for k in results["pika"]}})
    print_table(rows, [("mode", "mode", "s"), ("publish_cpu_ms_per_mb", "pub cpu ms/MB", ".3f"),
                       ("publish_wall_ms_per_mb", "pub wall ms/MB", ".3f"),
                       ("consume_cpu_ms_per_mb", "con cpu ms/MB", ".3f"),
                       ("consume_wall_ms_per_mb", "con wall ms/MB", ".3f")])
    write_json(args.json, {"benchmark": "pika_frames", "machine": machine(), "mib": args.mib,
                           "messages": args.messages, "results": results, "ratio_pikaframes_to_pika": rows[-1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

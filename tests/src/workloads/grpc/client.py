"""A gRPC client for doppel's end-to-end tests: CALLS unary calls to /doppel.Echo/Call over one
channel (one long-lived HTTP/2 connection), CONCURRENCY at a time as concurrent streams, RATE
batches a second. Of every ten calls, one is "fail" (INTERNAL) and one "missing" (NOT_FOUND).
Prints the status codes it got as JSON. Usage: client.py ADDR:PORT CALLS RATE CONCURRENCY"""
import json
import sys
import time

import grpc

addr, calls, rate, concurrency = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
KINDS = ["get"] * 7 + ["put", "fail", "missing"]
channel = grpc.insecure_channel(addr)
grpc.channel_ready_future(channel).result(timeout=10)
call = channel.unary_unary("/doppel.Echo/Call")
codes = {}
start = time.monotonic()
sent = 0
batch = 0
while sent < calls:
    due = start + batch / rate
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    n = min(concurrency, calls - sent)
    pending = [call.future(f"{KINDS[(sent + i) % 10]} {sent + i}".encode()) for i in range(n)]
    for f in pending:
        try:
            f.result(timeout=10)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        codes[code] = codes.get(code, 0) + 1
    sent += n
    batch += 1
channel.close()
print(json.dumps(codes))

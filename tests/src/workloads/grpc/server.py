"""A gRPC server for doppel's end-to-end tests: one unary method, /doppel.Echo/Call, that
appends the first word of each request to a log (the server's own record of what it executed)
and echoes it; "fail" answers INTERNAL and "missing" NOT_FOUND. Raw bytes, no protobuf.
Usage: server.py ADDR:PORT LOG"""
import sys
import threading
from concurrent import futures

import grpc

addr, log_path = sys.argv[1], sys.argv[2]
lock = threading.Lock()
log = open(log_path, "a", buffering=1)


def call(request, context):
    kind = request.split(b" ", 1)[0].decode() or "empty"
    with lock:
        log.write(kind + "\n")
    if kind == "fail":
        context.abort(grpc.StatusCode.INTERNAL, "asked to fail")
    if kind == "missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return request


handler = grpc.method_handlers_generic_handler(
    "doppel.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(addr)
server.start()
print("listening", flush=True)
server.wait_for_termination()

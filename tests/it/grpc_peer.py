"""A real gRPC server and client (grpcio) for tests/it/grpc.rs.

    grpc_peer.py server
        Serves /sheath.test.Echo/{Echo,Fail,Count} in plaintext HTTP/2 on
        127.0.0.1, prints the port, and stops when stdin closes.
    grpc_peer.py client TARGET [CA [CERT KEY]]
        Calls each method over TLS (verifying TARGET as `localhost` against
        CA, presenting CERT/KEY if given), or in plaintext HTTP/2 without
        CA, and prints one JSON object.

Messages are raw bytes, so no generated code is needed.
"""

import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "sheath.test.Echo"


def metadata(context):
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def echo(request, context):
    seen = metadata(context)
    return json.dumps({"message": request.decode(), "metadata": seen}).encode()


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def count(request, context):
    n = int(request.decode())
    for i in range(n):
        yield str(i).encode()
    context.set_trailing_metadata((("x-count", str(n)),))


def serve():
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # The test holds stdin open for as long as it needs the server.
    threading.Thread(target=lambda: (sys.stdin.read(), server.stop(0)), daemon=True).start()
    server.wait_for_termination()


def channel_to(target, ca=None, cert=None, key=None):
    if ca is None:
        return grpc.insecure_channel(target)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    options = (("grpc.ssl_target_name_override", "localhost"),)
    return grpc.secure_channel(target, credentials, options=options)


def call(target, *tls):
    out = {}
    with channel_to(target, *tls) as channel:
        echo_call = channel.unary_unary(f"/{SERVICE}/Echo")
        reply = echo_call(b"hello", timeout=10, metadata=(("x-forwarded-client-cert", "forged"),))
        out["echo"] = json.loads(reply)

        try:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"widget", timeout=10)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = {"code": e.code().name, "details": e.details()}

        stream = channel.unary_stream(f"/{SERVICE}/Count")(b"50", timeout=10)
        out["count"] = {
            "messages": [m.decode() for m in stream],
            "trailers": dict(stream.trailing_metadata()),
            "code": stream.code().name,
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        call(*sys.argv[2:])

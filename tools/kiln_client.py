"""Python stubs for Kiln's gRPC API, shared by the tools that drive a running
`kiln serve` (eval_routing.py, eval_sparse_ffn.py through it, eval_retrieval.py).

The stubs are generated from proto/kiln/v1/kiln.proto at run time with
grpc_tools (as tests/e2e/kiln_e2e.py does), so they always match the proto of
this checkout. Nothing here imports grpc at module load: a tool can import
this file (and be unit-tested) where grpcio is not installed.
"""
import atexit
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(ROOT, "proto")
KILN_PROTO = os.path.join(PROTO_ROOT, "kiln", "v1", "kiln.proto")

# Embeddings of a full batch are a few MB; gRPC's 4 MB default is too small.
MAX_MESSAGE_BYTES = 64 << 20

_stubs = None


def generate_stubs():
    """(kiln_pb2, kiln_pb2_grpc), generated once per process into a temporary
    folder that is removed at exit. Raises ImportError without grpc_tools and
    RuntimeError when protoc fails."""
    global _stubs
    if _stubs is not None:
        return _stubs
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="kiln-stubs-")
    atexit.register(shutil.rmtree, out, True)
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{wkt}",
                      f"--python_out={out}", f"--grpc_python_out={out}", KILN_PROTO])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {KILN_PROTO}")
    for sub in ("kiln", os.path.join("kiln", "v1")):
        open(os.path.join(out, sub, "__init__.py"), "a").close()
    sys.path.insert(0, out)
    from kiln.v1 import kiln_pb2, kiln_pb2_grpc  # noqa: E402
    _stubs = (kiln_pb2, kiln_pb2_grpc)
    return _stubs


def open_channel(target):
    """An insecure channel to target ("host:port") with message limits large
    enough for a full batch of embeddings. Does not wait for the server."""
    import grpc
    return grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


def server_info(stub, pb, channel, timeout, poll=0.5):
    """The server's InfoResponse once it serves: waits up to timeout seconds
    for the connection, then calls Info again while the server answers
    UNAVAILABLE (it does until its model is loaded and warm: "server is
    warming up"), until the same deadline. Raises TimeoutError saying what
    it waited for; any other grpc.RpcError as it came."""
    import grpc
    deadline = time.monotonic() + timeout
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise TimeoutError(f"no connection within {timeout:g} s (is `kiln serve` running "
                           f"on that port?)") from None
    while True:
        try:
            return stub.Info(pb.InfoRequest(), timeout=max(1.0, deadline - time.monotonic()))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if time.monotonic() + poll > deadline:
                raise TimeoutError(f"not serving after {timeout:g} s; Info still answers "
                                   f"{rpc_error(e)}") from None
        time.sleep(poll)


def rpc_error(e):
    """"CODE: message" of a grpc.RpcError, the server's status as sent."""
    return f"{e.code().name}: {e.details()}"


def stops_run(e):
    """Whether a grpc.RpcError means the server is gone or too old for the
    tool (UNAVAILABLE, UNIMPLEMENTED), so a run stops instead of recording
    the error and going on with the next call."""
    return e.code().name in ("UNIMPLEMENTED", "UNAVAILABLE")

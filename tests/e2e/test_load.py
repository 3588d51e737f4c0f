"""Many clients at once, and SIGTERM in the middle of load."""

from __future__ import annotations

import random
import signal
import threading
import time

import grpc

from kiln_e2e import (NUM_LAYERS, KilnServer, assert_matches_reference, channel, pb,
                      pb_grpc)


def _random_request(rng: random.Random, pool: list[str], max_inputs: int = 4):
    texts = [rng.choice(pool) for _ in range(rng.randint(1, max_inputs))]
    exit_layer = rng.choice([0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6])  # 0 = full depth
    return texts, exit_layer


def test_32_concurrent_clients_get_reference_vectors(start_server, pool, reference):
    """32 clients, each on its own connection, send mixed exits and lengths at
    once; every vector equals `kiln embed --exit=K`'s for the same text."""
    server: KilnServer = start_server()
    # Precompute the reference for the whole pool at every exit (6 short runs).
    for k in range(1, NUM_LAYERS + 1):
        reference.get(pool, k)

    n_clients, per_client = 32, 3
    barrier = threading.Barrier(n_clients, timeout=60)
    results: list[tuple] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(idx: int):
        rng = random.Random(1000 + idx)
        ch = channel(server.target, own_connection=True)
        stub = pb_grpc.KilnStub(ch)
        try:
            barrier.wait()
            for j in range(per_client):
                texts, exit_layer = _random_request(rng, pool)
                req = pb.EmbedRequest(inputs=texts, exit_layer=exit_layer)
                try:
                    resp = stub.Embed(req, timeout=120)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"client {idx} request {j} (exit {exit_layer}, "
                                      f"{len(texts)} inputs): {e.code().name}: {e.details()}")
                    continue
                with lock:
                    results.append((idx, j, texts, exit_layer, resp))
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not any(t.is_alive() for t in threads), "clients still running after 150 s"
    elapsed = time.monotonic() - t0

    assert not errors, "\n".join(errors[:20])
    assert len(results) == n_clients * per_client
    exits_seen = {e or NUM_LAYERS for _, _, _, e, _ in results}
    assert exits_seen == set(range(1, NUM_LAYERS + 1)), exits_seen
    for idx, j, texts, exit_layer, resp in results:
        assert_matches_reference(resp, texts, exit_layer, reference,
                                 what=f"client {idx} request {j}")
    print(f"{len(results)} requests from {n_clients} clients in {elapsed:.1f}s")


def test_sigterm_under_load_loses_no_accepted_request(start_server, pool, reference):
    """SIGTERM while clients keep sending: every RPC sent before the signal
    returns OK with the right vectors (none is dropped), RPCs sent after drain
    began get UNAVAILABLE, and the process exits 0."""
    for k in range(1, NUM_LAYERS + 1):
        reference.get(pool, k)
    server: KilnServer = start_server(drain_timeout_s=30)

    n_clients = 12
    records: list[dict] = []
    lock = threading.Lock()
    sig_sent = threading.Event()
    t_sig = [None]
    hard_stop = time.monotonic() + 90  # every loop below is bounded in time and count

    def client(idx: int):
        rng = random.Random(5000 + idx)
        ch = channel(server.target, own_connection=True)
        stub = pb_grpc.KilnStub(ch)
        unavailable_after_sig = 0
        try:
            for _ in range(400):
                if time.monotonic() > hard_stop or unavailable_after_sig >= 3:
                    break
                texts, exit_layer = _random_request(rng, pool)
                rec = {"client": idx, "texts": texts, "exit": exit_layer,
                       "start": time.monotonic()}
                try:
                    rec["resp"] = stub.Embed(pb.EmbedRequest(inputs=texts, exit_layer=exit_layer),
                                             timeout=60)
                    rec["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    rec["code"], rec["details"] = e.code(), e.details()
                rec["end"] = time.monotonic()
                with lock:
                    records.append(rec)
                if sig_sent.is_set() and rec["code"] != grpc.StatusCode.OK:
                    unavailable_after_sig += 1
                    time.sleep(0.05)
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()

    # Let load build up: wait for some completed requests, then signal.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            done_ok = sum(1 for r in records if r["code"] == grpc.StatusCode.OK)
        if done_ok >= 24:
            break
        time.sleep(0.05)
    assert server.alive(), server.describe()
    t_sig[0] = time.monotonic()
    server.signal(signal.SIGTERM)
    sig_sent.set()

    rc = server.wait_exit(timeout=45)
    t_exit = time.monotonic()
    for t in threads:
        t.join(timeout=max(1.0, hard_stop - time.monotonic() + 5))
    assert not any(t.is_alive() for t in threads), "clients still running"
    assert rc == 0, f"kiln serve exit status {rc} after SIGTERM: {server.describe()}"

    ts = t_sig[0]
    ok = [r for r in records if r["code"] == grpc.StatusCode.OK]
    bad = [r for r in records if r["code"] != grpc.StatusCode.OK]
    in_flight_ok = [r for r in ok if r["start"] < ts < r["end"]]
    after_ok = [r for r in ok if r["start"] >= ts]
    unavailable = [r for r in bad if r["code"] == grpc.StatusCode.UNAVAILABLE]
    print(f"{len(records)} RPCs: {len(ok)} OK ({len(in_flight_ok)} in flight at SIGTERM, "
          f"{len(after_ok)} sent after it), {len(unavailable)} UNAVAILABLE; "
          f"exit {t_exit - ts:.2f}s after SIGTERM")

    def show(r):
        return (f"client {r['client']} exit {r['exit']} {len(r['texts'])} inputs, sent "
                f"{r['start'] - ts:+.3f}s, ended {r['end'] - ts:+.3f}s from SIGTERM: "
                f"{r['code'].name}: {r.get('details')}")

    # Only OK or UNAVAILABLE, never CANCELLED / INTERNAL / a dropped stream.
    others = [r for r in bad if r["code"] != grpc.StatusCode.UNAVAILABLE]
    assert not others, "unexpected codes:\n" + "\n".join(show(r) for r in others[:20])
    # UNAVAILABLE only for RPCs that reached the server after drain began: a
    # request sent well before SIGTERM was accepted and must finish OK.
    lost = [r for r in unavailable if r["start"] < ts - 0.5 or r["end"] < ts]
    assert not lost, "accepted RPCs lost in drain:\n" + "\n".join(show(r) for r in lost[:20])
    # RPCs sent after drain began are refused.
    late_ok = [r for r in ok if r["start"] > ts + 0.5]
    assert not late_ok, "RPCs sent >0.5 s after SIGTERM were served:\n" + "\n".join(
        show(r) for r in late_ok[:20])
    assert unavailable, "no RPC got UNAVAILABLE after SIGTERM (did the clients keep sending?)"
    assert in_flight_ok, "no RPC was in flight at SIGTERM: the drain was not exercised"
    for r in ok:
        assert_matches_reference(r["resp"], r["texts"], r["exit"], reference,
                                 what=f"client {r['client']} (sent {r['start'] - ts:+.3f}s)")

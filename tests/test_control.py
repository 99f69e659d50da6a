"""The control channel (fastsip/server/control.py): one answer per request, matched by id."""
import socket
import threading

from fastsip.server import control


def _worker(sock, delays):
    """Answer each request with its own op and id, after a delay per request (seconds)."""
    reader = control.Reader()
    answered = 0
    while answered < len(delays):
        data = sock.recv(65536)
        if not data:
            return
        for msg in reader.feed(data):
            threading.Event().wait(delays[answered])
            sock.sendall(control.encode({"op": msg["op"], "id": msg["id"]}))
            answered += 1


def test_a_late_answer_is_not_taken_for_the_next_request():
    sup, wk = socket.socketpair()
    t = threading.Thread(target=_worker, args=(wk, [0.5, 0.0, 0.0]), daemon=True)
    t.start()
    try:
        reader = control.Reader()
        assert control.request(sup, {"op": "stats"}, 0.1, reader) is None      # too late
        threading.Event().wait(0.6)             # the late answer is now in the socket
        assert control.request(sup, {"op": "lookup"}, 2.0, reader)["op"] == "lookup"
        assert control.request(sup, {"op": "remove"}, 2.0, reader)["op"] == "remove"
    finally:
        sup.close()
        t.join(2)
        wk.close()


def test_a_partly_read_answer_is_kept_for_the_next_request():
    sup, wk = socket.socketpair()
    try:
        reader = control.Reader()
        late = control.encode({"op": "stats", "id": -1})
        wk.sendall(late[:7])                    # half an answer, then the request times out
        assert control.request(sup, {"op": "stats"}, 0.1, reader) is None
        wk.recv(65536)
        wk.sendall(late[7:])

        def answer():
            msg = control.Reader().feed(wk.recv(65536))[0]
            wk.sendall(control.encode({"op": "ok", "id": msg["id"]}))
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert control.request(sup, {"op": "lookup"}, 2.0, reader)["op"] == "ok"
        t.join(2)
    finally:
        sup.close()
        wk.close()

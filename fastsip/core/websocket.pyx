# --------------------------------------------------------------------------
# WebSocket frames, server side (RFC 6455 section 5; SIP over it: RFC 7118).
# Bytes of the stream in, complete data messages out; pings, pongs and the
# close handshake are answered inside.  The HTTP handshake is Python's
# (fastsip/websocket.py): it is once per connection.
# --------------------------------------------------------------------------

# the tokens of WsEnd, in its order (WsFramer.reason)
cdef tuple WS_REASONS = (None, "unmasked", "too_big", "protocol", "utf8", "closed")


cdef inline bint ws_unmask(unsigned char* dst, const unsigned char* src, Py_ssize_t n,
                           const unsigned char* key) noexcept nogil:
    """``dst[:n]`` = ``src[:n]`` XOR the 4-byte masking key repeated (RFC 6455
    5.3), 8 bytes at a time.  True when every byte written is ASCII."""
    cdef uint32_t k4
    cdef uint64_t k8, w, high = 0
    cdef unsigned char tail = 0
    cdef Py_ssize_t i = 0
    memcpy(&k4, key, 4)
    k8 = (<uint64_t>k4 << 32) | k4       # the key twice, in memory order on any endianness
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= k8
        high |= w
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:                          # i is a multiple of 8 here, so i & 3 is the key's index
        dst[i] = src[i] ^ key[i & 3]
        tail |= dst[i]
        i += 1
    return (high & HIGH_BITS) == 0 and tail < 0x80


cdef inline void utf8_reset(Utf8State* s) noexcept nogil:
    s.need = 0
    s.lo = 0x80
    s.hi = 0xBF


cdef int utf8_check(const unsigned char* p, Py_ssize_t n, Utf8State* s) noexcept nogil:
    """Carries the UTF-8 validation of a message on by ``p[:n]`` (RFC 3629: no
    overlong form, no surrogate, nothing above U+10FFFF).  -1 at the first byte
    that no valid message can hold; a message is valid when ``s.need`` is 0 at
    its end.  A sequence may be cut between two frames."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    cdef uint64_t w
    while i < n:
        c = p[i]
        i += 1
        if s.need:
            if c < s.lo or c > s.hi:
                return -1
            s.need -= 1
            s.lo = 0x80
            s.hi = 0xBF
        elif c < 0x80:
            while i + 8 <= n:             # ASCII runs 8 bytes at a time
                memcpy(&w, p + i, 8)
                if w & HIGH_BITS:
                    break
                i += 8
        elif c < 0xC2:                    # a continuation byte, or an overlong 2-byte form
            return -1
        elif c < 0xE0:
            s.need = 1
        elif c < 0xF0:
            s.need = 2
            if c == 0xE0:
                s.lo = 0xA0               # overlong
            elif c == 0xED:
                s.hi = 0x9F               # U+D800..U+DFFF
        elif c < 0xF5:
            s.need = 3
            if c == 0xF0:
                s.lo = 0x90               # overlong
            elif c == 0xF4:
                s.hi = 0x8F               # above U+10FFFF
        else:
            return -1
    return 0


cdef inline bint ws_close_code_ok(int code) noexcept nogil:
    """May a close frame carry ``code`` (RFC 6455 7.4, the IANA registry)?"""
    return (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


cdef inline Py_ssize_t ws_header(unsigned char* d, int first, Py_ssize_t n) noexcept nogil:
    """Writes an unmasked frame header (server to client) for ``n`` payload bytes
    into ``d`` (room for 10); returns its length."""
    cdef int i
    d[0] = <unsigned char>first
    if n < 126:
        d[1] = <unsigned char>n
        return 2
    if n < 65536:
        d[1] = 126
        d[2] = <unsigned char>(n >> 8)
        d[3] = <unsigned char>n
        return 4
    d[1] = 127
    for i in range(8):
        d[9 - i] = <unsigned char>((<uint64_t>n) >> (8 * i))
    return 10


cdef bytes ws_frame(int first, const unsigned char* body, Py_ssize_t n):
    """One unmasked frame: ``first`` is its first byte (FIN, opcode)."""
    cdef bytes f = PyBytes_FromStringAndSize(NULL, n + (2 if n < 126 else 4 if n < 65536 else 10))
    cdef unsigned char* d = <unsigned char*>PyBytes_AS_STRING(f)
    cdef Py_ssize_t h = ws_header(d, first, n)
    if n:
        memcpy(d + h, body, n)
    return f


cdef inline bint ws_grow(unsigned char** buf, Py_ssize_t* cap, Py_ssize_t need) noexcept:
    """Room for ``need`` bytes in ``*buf``; False when memory is short."""
    cdef Py_ssize_t c
    cdef unsigned char* b
    if need <= cap[0]:
        return True
    c = cap[0] * 2 if cap[0] * 2 > need else need
    b = <unsigned char*>PyMem_Realloc(buf[0], c)
    if b == NULL:
        return False
    buf[0] = b
    cap[0] = c
    return True


@cython.final
cdef class WsFramer:
    """The frames of a server's WebSocket connection (RFC 6455), once the
    handshake is done.

    ``feed(data)`` takes bytes as read from the stream and returns the data
    messages completed by them, each as ``bytes`` (text and binary alike; RFC
    7118 puts one SIP message in each), fragments joined.  Control frames are
    handled inside: a ping queues a pong, a close queues the echo; take what is
    queued with ``data_to_send()`` and write it.  Client frames must be masked
    (RFC 6455 5.1).  A frame longer than ``max_frame``, or a message longer than
    ``max_message``, is refused with close 1009 before its payload is read; a
    protocol error closes with 1002, a text message that is not UTF-8 with 1007.
    Then, or after the peer's close, ``closing`` is true: write what is queued
    and close the connection.  Input after that is ignored.  Messages completed
    in the same ``feed`` before the error are returned.

    ``frame(message)`` and ``close_frame(code)`` write the server's frames.
    """

    def __init__(self, *, Py_ssize_t max_message=16384, Py_ssize_t max_frame=0):
        if max_message <= 0 or max_frame < 0:
            raise ValueError("max_message must be positive, max_frame >= 0 (0: max_message)")
        self.max_message = max_message
        self.max_frame = max_frame if 0 < max_frame < max_message else max_message
        utf8_reset(&self.u8)

    def __dealloc__(self):
        PyMem_Free(self.fbuf)
        PyMem_Free(self.mbuf)

    @property
    def buffered(self):
        """Bytes held: of a frame not yet complete and of a message's earlier fragments."""
        return self.flen + self.mlen

    @property
    def closing(self):
        """True once the connection must be closed (after ``data_to_send()`` is written)."""
        return self.state == WS_CLOSED

    @property
    def reason(self):
        """Why the connection ends: None, or "unmasked", "too_big", "protocol",
        "utf8" (the close sent for the peer's error), "closed" (the peer's close)."""
        return WS_REASONS[<int>self.end]

    @property
    def close_code(self):
        """The status code of the close frame sent, None before one is sent
        (1005, "no status", for the echo of a close that had no code)."""
        return self.sent_code if self.state != WS_OPEN else None

    def data_to_send(self):
        """The pongs and close frames queued by ``feed``, to write now (b"" when none)."""
        if not self.out:
            return b""
        b = bytes(self.out)
        del self.out[:]
        return b

    def frame(self, message, bint binary=False):
        """One frame holding ``message`` (server to client: FIN, unmasked).  A
        text frame, unless ``binary`` or ``message`` is not valid UTF-8 (a text
        frame must be, RFC 6455 5.6): then a binary frame."""
        cdef bytes b = message if type(message) is bytes else bytes(message)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(b)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
        cdef Utf8State u
        if not binary:
            utf8_reset(&u)
            binary = utf8_check(p, n, &u) < 0 or u.need != 0
        return ws_frame(0x80 | (WS_BINARY if binary else WS_TEXT), p, n)

    def close_frame(self, int code=1000):
        """A close frame with ``code``, for the server's own close (shutdown, idle).
        After it, data messages received are dropped and the peer's close ends
        the connection (``closing``).  b"" when a close was sent already."""
        cdef unsigned char body[2]
        if not ws_close_code_ok(code):
            raise ValueError(f"{code} is no close code an endpoint may send (RFC 6455 7.4)")
        if self.state != WS_OPEN:
            return b""
        self.state = WS_CLOSE_SENT
        self.sent_code = code
        body[0] = <unsigned char>(code >> 8)
        body[1] = <unsigned char>code
        return ws_frame(0x80 | WS_CLOSE, body, 2)

    def ping_frame(self):
        """An empty ping frame: a live peer answers it with a pong (RFC 6455
        5.5.2).  b"" once a close was sent."""
        if self.state != WS_OPEN:
            return b""
        return ws_frame(0x80 | WS_PING, NULL, 0)

    def feed(self, data):
        """The data messages completed by ``data`` (a list of bytes, often empty)."""
        cdef bytes b
        cdef list got = []
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, need, take
        if self.state == WS_CLOSED:
            return got
        if type(data) is bytes:
            b = <bytes>data
        elif isinstance(data, (bytearray, memoryview)):
            b = bytes(data)
        else:
            raise TypeError(f"feed() takes bytes, not {type(data).__name__}")
        p = <const unsigned char*>PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
        while self.state != WS_CLOSED:
            if self.flen:
                # a frame begun in an earlier read: complete it in fbuf
                need = self.frame_need(self.fbuf, self.flen)
                if need < 0:
                    self.fail(<WsEnd>(-need), 1009 if need == -WS_END_TOO_BIG else 1002)
                    break
                if need <= self.flen:
                    self.take_frame(self.fbuf, need, got)
                    self.drop_frame_buffer()
                    continue
                # up to the end of the header (then its length is known) or of the frame
                take = need - self.flen
                if take > n - pos:
                    take = n - pos
                if take == 0:
                    break
                if not ws_grow(&self.fbuf, &self.fcap, self.flen + take):
                    raise MemoryError()
                memcpy(self.fbuf + self.flen, p + pos, take)
                self.flen += take
                pos += take
                continue
            if pos == n:
                break
            need = self.frame_need(p + pos, n - pos)
            if need < 0:
                self.fail(<WsEnd>(-need), 1009 if need == -WS_END_TOO_BIG else 1002)
                break
            if need > n - pos:
                # the rest is the start of a frame: hold it
                if not ws_grow(&self.fbuf, &self.fcap, n - pos):
                    raise MemoryError()
                memcpy(self.fbuf, p + pos, n - pos)
                self.flen = n - pos
                break
            self.take_frame(p + pos, need, got)
            pos += need
        return got

    cdef void drop_frame_buffer(self) noexcept:
        PyMem_Free(self.fbuf)
        self.fbuf = NULL
        self.flen = self.fcap = 0

    cdef void drop_message_buffer(self) noexcept:
        PyMem_Free(self.mbuf)
        self.mbuf = NULL
        self.mlen = self.mcap = 0
        self.mop = 0

    cdef Py_ssize_t frame_need(self, const unsigned char* p, Py_ssize_t n) noexcept nogil:
        """The length of the frame starting at ``p`` (``n`` bytes there), or of its
        header while that is incomplete (so: more than ``n`` means wait), or
        -WsEnd when the frame is refused.  Checked as soon as the bytes that
        show it are in: a refused frame's payload is never waited for."""
        cdef unsigned int b0, b1, op
        cdef Py_ssize_t hdr
        cdef uint64_t plen
        cdef int i
        if n < 2:
            return 2
        b0 = p[0]
        b1 = p[1]
        op = b0 & 0x0F
        if not (b1 & 0x80):
            return -WS_END_UNMASKED       # client frames are masked (5.1)
        if b0 & 0x70:
            return -WS_END_PROTOCOL       # RSV1-3 without an extension (5.2)
        if op >= 0x8:
            # close, ping, pong: at most 125 bytes, never fragmented (5.5)
            if op > WS_PONG or not (b0 & 0x80) or (b1 & 0x7F) > 125:
                return -WS_END_PROTOCOL
        elif op == WS_CONT:
            if self.mop == 0:
                return -WS_END_PROTOCOL   # a continuation of nothing
        elif op == WS_TEXT or op == WS_BINARY:
            if self.mop != 0:
                return -WS_END_PROTOCOL   # a new message inside a fragmented one (5.4)
        else:
            return -WS_END_PROTOCOL       # reserved opcode
        plen = b1 & 0x7F
        hdr = 8 if plen == 126 else 14 if plen == 127 else 6
        if n < hdr - 4:                   # the length is checked before the masking key is in
            return hdr
        if plen == 126:
            plen = (<uint64_t>p[2] << 8) | p[3]
        elif plen == 127:
            if p[2] & 0x80:
                return -WS_END_PROTOCOL   # the most significant bit must be 0 (5.2)
            plen = 0
            for i in range(2, 10):
                plen = (plen << 8) | p[i]
        if plen > <uint64_t>self.max_frame:
            return -WS_END_TOO_BIG
        if op < 0x8 and <uint64_t>self.mlen + plen > <uint64_t>self.max_message:
            return -WS_END_TOO_BIG
        return hdr + <Py_ssize_t>plen     # (more than n while the key is missing: wait)

    cdef int take_frame(self, const unsigned char* p, Py_ssize_t size, list got) except -2:
        """Acts on one complete frame that ``frame_need`` accepted."""
        cdef int op = p[0] & 0x0F
        cdef bint fin = p[0] & 0x80
        cdef int len7 = p[1] & 0x7F
        cdef const unsigned char* key = p + (2 if len7 < 126 else 4 if len7 == 126 else 10)
        cdef const unsigned char* body = key + 4
        cdef Py_ssize_t n = size - (body - p)
        cdef bytes msg
        cdef bint ascii
        cdef Utf8State u
        cdef unsigned char ctl[125]
        if op == WS_TEXT or op == WS_BINARY:
            if fin:
                # the common case: one frame, one message, unmasked into its bytes object
                msg = PyBytes_FromStringAndSize(NULL, n)
                ascii = ws_unmask(<unsigned char*>PyBytes_AS_STRING(msg), body, n, key)
                if op == WS_TEXT and not ascii:
                    utf8_reset(&u)
                    if utf8_check(<const unsigned char*>PyBytes_AS_STRING(msg), n, &u) < 0 or u.need:
                        return self.fail(WS_END_UTF8, 1007)
                if self.state == WS_OPEN:
                    got.append(msg)
                return 0
            self.mop = op
            utf8_reset(&self.u8)
        if op < 0x8:
            # a fragment: joined in mbuf
            if not ws_grow(&self.mbuf, &self.mcap, self.mlen + n):
                raise MemoryError()
            ascii = ws_unmask(self.mbuf + self.mlen, body, n, key)
            if self.mop == WS_TEXT and not (ascii and self.u8.need == 0):
                if utf8_check(self.mbuf + self.mlen, n, &self.u8) < 0:
                    return self.fail(WS_END_UTF8, 1007)
            self.mlen += n
            if fin:
                if self.mop == WS_TEXT and self.u8.need:
                    return self.fail(WS_END_UTF8, 1007)
                msg = PyBytes_FromStringAndSize(<const char*>self.mbuf, self.mlen)
                self.drop_message_buffer()
                if self.state == WS_OPEN:
                    got.append(msg)
            return 0
        ws_unmask(ctl, body, n, key)
        if op == WS_PING:
            if self.state == WS_OPEN:
                self.send_control(WS_PONG, ctl, n)
        elif op == WS_CLOSE:
            self.take_close(ctl, n)
        return 0                          # a pong: nothing to do

    cdef int take_close(self, const unsigned char* body, Py_ssize_t n) except -1:
        """The peer's close (5.5.1): echoed with its code (none when it gave none)."""
        cdef int code
        cdef Utf8State u
        if self.state == WS_CLOSE_SENT:
            self.state = WS_CLOSED            # the answer to ours
            self.end = WS_END_CLOSED
            return 0
        if n == 0:
            self.send_control(WS_CLOSE, body, 0)
            self.sent_code = 1005
        else:
            if n == 1:
                return self.fail(WS_END_PROTOCOL, 1002)
            code = (body[0] << 8) | body[1]
            if not ws_close_code_ok(code):
                return self.fail(WS_END_PROTOCOL, 1002)
            utf8_reset(&u)
            if utf8_check(body + 2, n - 2, &u) < 0 or u.need:
                return self.fail(WS_END_UTF8, 1007)
            self.send_control(WS_CLOSE, body, 2)
            self.sent_code = code
        self.state = WS_CLOSED
        self.end = WS_END_CLOSED
        self.drop_frame_buffer()
        self.drop_message_buffer()
        return 0

    cdef int fail(self, WsEnd why, int code) except -1:
        """Fails the connection (7.1.7): a close with ``code`` (unless ours is out
        already), then nothing more is read."""
        cdef unsigned char body[2]
        if self.state == WS_OPEN:
            body[0] = <unsigned char>(code >> 8)
            body[1] = <unsigned char>code
            self.send_control(WS_CLOSE, body, 2)
            self.sent_code = code
        self.state = WS_CLOSED
        self.end = why
        self.drop_frame_buffer()
        self.drop_message_buffer()
        return 0

    cdef int send_control(self, int opcode, const unsigned char* body, Py_ssize_t n) except -1:
        cdef unsigned char f[127]
        cdef Py_ssize_t h = ws_header(f, 0x80 | opcode, n)
        if n:
            memcpy(f + h, body, n)
        if self.out is None:
            self.out = bytearray()        # made at the first pong or close: idle connections are many
        self.out += PyBytes_FromStringAndSize(<const char*>f, h + n)
        return 0

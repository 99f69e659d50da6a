
PING = b"\r\n\r\n"      # RFC 5626 keep-alive ping: answer with PONG
PONG = b"\r\n"


cdef class StreamFramer:
    """Splits a stream (TCP) into SIP messages by Content-Length (RFC 3261 18.3).

    ``feed(data)`` returns the complete items received so far: each a message's
    bytes, or :data:`PING` for an RFC 5626 CRLFCRLF keep-alive (answer it with
    :data:`PONG`).  A single CRLF between messages is skipped.  A stream that
    cannot be framed (no or bad Content-Length, too large) raises
    :class:`fastsip.ParseError`; the connection should then be closed.
    """

    cdef bytearray _buf
    cdef Limits lim
    cdef Py_ssize_t _searched    # bytes at the start of _buf known to hold no header end
    cdef Py_ssize_t _need        # length of the message at the start of _buf, 0: not known yet

    def __init__(self, *, Py_ssize_t max_size=65535):
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self._buf = bytearray()
        self.lim = (<Parser>_default_parser).lim
        self.lim.max_size = max_size

    @property
    def buffered(self):
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data):
        cdef list out = []
        cdef bytearray buf = self._buf
        cdef Py_ssize_t end, lf, total
        cdef Msg m
        cdef bytes head
        cdef int rc
        buf += data
        while buf:
            if self._need:
                if len(buf) < self._need:
                    break
                total = self._need
                out.append(bytes(buf[:total]))
                del buf[:total]
                self._need = self._searched = 0
                continue
            if buf[0] == 13 or buf[0] == 10:
                if buf.startswith(PING):
                    out.append(PING)
                    del buf[:4]
                    continue
                if len(buf) < 4 and PING.startswith(bytes(buf)):
                    break           # maybe the start of a ping
                del buf[:2 if buf.startswith(PONG) else 1]
                continue
            end = buf.find(b"\r\n\r\n", self._searched)
            lf = buf.find(b"\n\n", self._searched, end if end >= 0 else len(buf))
            if lf >= 0 and (end < 0 or lf < end):
                end, total = lf, lf + 2
            else:
                total = end + 4
            if end < 0:
                if len(buf) > self.lim.max_size:
                    raise _errors.MessageTooLarge(
                        f"header section exceeds max_size ({self.lim.max_size})", len(buf))
                self._searched = len(buf) - 3 if len(buf) > 3 else 0
                break
            head = bytes(buf[:total])
            rc = scan_message(head, len(head), &m, &self.lim)
            msg_release(&m)
            if rc != OK and rc != E_BODY_SHORT:
                raise_parse_error(rc, m.err_pos, head, &self.lim, &m)
            if m.content_length < 0:
                raise _errors.BadContentLength(
                    "Content-Length is required on stream transports", total, head)
            total += <Py_ssize_t>m.content_length
            if total > self.lim.max_size:
                raise _errors.MessageTooLarge(
                    f"message of {total} bytes exceeds max_size ({self.lim.max_size})", m.cl_pos,
                    head)
            self._need = total      # the rest of the loop waits for, then cuts, the message
        return out


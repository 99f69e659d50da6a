# WebSocket frames, server side (websocket.pyx): RFC 6455 section 5.

cdef enum WsOpcode:
    WS_CONT = 0x0
    WS_TEXT = 0x1
    WS_BINARY = 0x2
    WS_CLOSE = 0x8
    WS_PING = 0x9
    WS_PONG = 0xA

cdef enum WsState:
    WS_OPEN = 0
    WS_CLOSE_SENT       # our close is out (close_frame): data is dropped until the peer's close
    WS_CLOSED           # the connection ends once the output is written; input is ignored

# Why a connection ends: a negative return of the frame checks, and the index of
# the token in WS_REASONS (websocket.pyx)
cdef enum WsEnd:
    WS_END_NONE = 0
    WS_END_UNMASKED     # close 1002
    WS_END_TOO_BIG      # close 1009
    WS_END_PROTOCOL     # close 1002
    WS_END_UTF8         # close 1007
    WS_END_CLOSED       # the peer's close, echoed

# Where a text message's UTF-8 validation stands between frames (RFC 3629):
# continuation bytes still owed, and the range allowed for the next one
cdef struct Utf8State:
    uint8_t need
    uint8_t lo
    uint8_t hi


cdef class WsFramer:
    cdef readonly Py_ssize_t max_message
    cdef readonly Py_ssize_t max_frame
    cdef WsState state
    cdef WsEnd end
    cdef int sent_code           # the code of the close we sent (1005: an echo without one)
    cdef unsigned char* fbuf     # the frame being received, when one read did not hold all of it
    cdef Py_ssize_t flen, fcap
    cdef unsigned char* mbuf     # the fragments of the message being reassembled
    cdef Py_ssize_t mlen, mcap
    cdef int mop                 # that message's opcode (WS_TEXT, WS_BINARY), 0 when none
    cdef Utf8State u8
    cdef bytearray out           # pongs and the close, for data_to_send() (None before the first)

    cdef Py_ssize_t frame_need(self, const unsigned char* p, Py_ssize_t n) noexcept nogil
    cdef int take_frame(self, const unsigned char* p, Py_ssize_t size, list got) except -2
    cdef int take_close(self, const unsigned char* body, Py_ssize_t n) except -1
    cdef void drop_frame_buffer(self) noexcept
    cdef void drop_message_buffer(self) noexcept
    cdef int fail(self, WsEnd why, int code) except -1
    cdef int send_control(self, int opcode, const unsigned char* body, Py_ssize_t n) except -1

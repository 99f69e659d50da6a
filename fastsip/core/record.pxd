# An AOR's bindings as one record (record.pyx): the state file's rows and the
# value a shared location keeps per AOR.  The byte layout is docs/record.md.

cdef enum:
    RECORD_VERSION = 1      # the first byte of every record this build writes
    RECORD_HEAD = 13        # version u8, AOR version u64, binding count u32
    RECORD_FIXED = 33       # a binding's fixed-width fields, before its six strings
    RECORD_STRINGS = 6      # contact URI, Call-ID, +sip.instance, Path, User-Agent, source host

# Why a record does not decode: a negative return of record_head / record_next,
# and the index of its text in RECORD_ERRORS (record.pyx)
cdef enum RecordError:
    REC_TRUNCATED = -1      # ends inside the header or a binding
    REC_VERSION = -2        # a first byte this build does not read
    REC_TRANSPORT = -3      # a transport number beyond wss
    REC_Q = -4              # q outside -1 (none) .. 1000
    REC_EMPTY_URI = -5      # a binding without a contact URI
    REC_TRAILING = -6       # bytes after the last binding
    REC_EXPIRY = -7         # an expiry that is NaN


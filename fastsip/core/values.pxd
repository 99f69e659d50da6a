# Spans of the values the scanners read (values.pyx).

# A name-addr / addr-spec with its parameters (From, To, Contact, Route, Path).
cdef struct NameAddr:
    Span display         # display name, raw (with its quotes when quoted)
    Span uri             # the URI without <>
    Span params          # ";a=b;c" after the URI, raw (may be empty)
    Span p_expires       # value spans of well-known params; off = -1 when absent
    Span p_q
    Span p_tag
    Span p_instance      # +sip.instance (raw, with quotes)
    Span p_regid
    Span raw             # the whole entry, trimmed
    uint8_t quoted       # display name is a quoted-string
    uint8_t star         # the wildcard Contact "*"
    uint8_t bracketed    # URI was written inside <>


# A parsed SIP/SIPS URI.
cdef struct UriSpans:
    Span scheme
    Span user            # raw, still escaped; length 0 and off -1 when absent
    Span password
    Span host            # with the brackets of an IPv6 reference
    Span params          # ";..." raw
    Span headers         # "?..." raw, without the "?"
    int port             # -1 when absent
    uint8_t sips


cdef struct ViaSpans:
    Span protocol
    Span version
    Span transport
    Span host
    Span params
    Span branch
    Span raw
    int port


cdef struct TokenIter:
    int htype
    int i                # the header line being read; -1 before the first
    Py_ssize_t pos, end

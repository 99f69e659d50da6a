
# --------------------------------------------------------------------------
# Values: quoted strings, parameters, name-addr, Via, URIs
# --------------------------------------------------------------------------

cdef Py_ssize_t bad_call_id(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Call-ID = word [ "@" word ]: the offset of the first byte that breaks
    the rule, or -1 when the value is a valid Call-ID."""
    cdef Py_ssize_t p
    cdef int ats = 0
    if s >= e:
        return s
    for p in range(s, e):
        if buf[p] == b'@':
            ats += 1
            if ats == 1 and p > s and p + 1 < e:
                continue
        if not (CC[<unsigned char>buf[p]] & C_WORD):
            return p
    return -1


cdef Py_ssize_t next_list_token(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                                Span* tok) noexcept nogil:
    """The next element of a comma-separated token list (Require, Supported, ...)
    from ``pos``: its span in ``tok`` (length 0 when the list has ended) and the
    position after it and its comma; -1 when malformed, with tok.off there."""
    cdef Py_ssize_t p
    pos = skip_lws(buf, pos, end)
    tok.off = pos
    tok.length = 0
    if pos >= end:
        return end
    p = skip_token(buf, pos, end)
    tok.length = p - pos
    if tok.length == 0:
        return -1
    p = skip_lws(buf, p, end)
    if p < end:
        if buf[p] != b',':
            tok.off = p
            return -1
        p += 1
    return p


cdef int next_header_token(const char* buf, const Msg* m, TokenIter* it, Span* tok) noexcept nogil:
    """The next option tag / token of every header line of type ``it.htype``
    (start with ``it.i = -1``): 1 with ``tok`` set, 0 when all lines are done,
    -1 when a list is malformed (``tok.off`` at the bad byte)."""
    cdef const Header* h
    while True:
        if it.i >= 0 and it.pos < it.end:
            it.pos = next_list_token(buf, it.pos, it.end, tok)
            if it.pos < 0:
                return -1
            if tok.length:
                return 1
            continue
        it.i = m.first[it.htype] if it.i < 0 else it.i + 1
        if it.i < 0:
            return 0
        while it.i < m.nheaders and m.hdrs[it.i].htype != it.htype:
            it.i += 1
        if it.i >= m.nheaders:
            it.i = m.nheaders
            it.pos = it.end = 0
            return 0
        h = &m.hdrs[it.i]
        it.pos = h.val_off
        it.end = h.val_off + h.val_len


cdef Py_ssize_t scan_param(const char* buf, Py_ssize_t pos, Py_ssize_t end,
                           Span* name, Span* value, Py_ssize_t* err_pos) noexcept nogil:
    """One ``; name [= value]`` (pos at the ';').  Returns the index after it and
    its trailing LWS, or -1 with err_pos.  value.off is -1 when there is no '='."""
    cdef bint escaped = False
    pos = skip_lws(buf, pos + 1, end)
    name.off = pos
    pos = skip_token(buf, pos, end)
    name.length = pos - name.off
    if name.length == 0:
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos, end)
    value.off = -1
    value.length = 0
    if pos < end and buf[pos] == b'=':
        pos = skip_lws(buf, pos + 1, end)
        value.off = pos
        if pos < end and buf[pos] == b'"':
            pos = scan_quoted(buf, pos, end, True, &escaped)
            if pos < 0:
                err_pos[0] = value.off
                return -1
        else:
            while pos < end and UC[<unsigned char>buf[pos]] & U_PVAL:
                pos += 1
        value.length = pos - value.off
        if value.length == 0:
            err_pos[0] = pos
            return -1
        pos = skip_lws(buf, pos, end)
    return pos


cdef inline void clear_span(Span* s) noexcept nogil:
    s.off = -1
    s.length = 0


cdef Py_ssize_t scan_params_until(const char* buf, Py_ssize_t pos, Py_ssize_t end, bint in_list,
                                  NameAddr* na, Py_ssize_t* err_pos) noexcept nogil:
    """Header parameters after a name-addr; records the well-known ones in ``na``.
    Stops at the end or, in a list, after the ',' that ends this entry."""
    cdef Span name, value
    cdef Py_ssize_t start = pos
    na.params.off = pos
    while pos < end and buf[pos] == b';':
        pos = scan_param(buf, pos, end, &name, &value, err_pos)
        if pos < 0:
            return -1
        if name.length == 7 and ieq(buf + name.off, 7, b"expires", 7):
            na.p_expires = value
        elif name.length == 1 and LOWER[<unsigned char>buf[name.off]] == b'q':
            na.p_q = value
        elif name.length == 3 and ieq(buf + name.off, 3, b"tag", 3):
            na.p_tag = value
        elif name.length == 13 and ieq(buf + name.off, 13, b"+sip.instance", 13):
            na.p_instance = value
        elif name.length == 6 and ieq(buf + name.off, 6, b"reg-id", 6):
            na.p_regid = value
    na.params.length = pos - start
    while na.params.length > 0 and is_lws(buf[start + na.params.length - 1]):
        na.params.length -= 1
    if pos < end:
        if in_list and buf[pos] == b',':
            return pos + 1
        err_pos[0] = pos
        return -1
    return pos


cdef Py_ssize_t parse_name_addr(const char* buf, Py_ssize_t pos, Py_ssize_t end, NameAddr* na,
                                bint in_list, Py_ssize_t* err_pos) noexcept nogil:
    """One name-addr or addr-spec with its header parameters (RFC 3261 20.10).

    Returns the index after the entry (after its ',' when ``in_list``) or -1
    with err_pos.  An addr-spec (no <>) ends at ';', ',' or LWS, and may not
    hold '?' (then the name-addr form is required).
    """
    cdef Py_ssize_t s, p
    cdef bint escaped = False
    clear_span(&na.display)
    clear_span(&na.p_expires)
    clear_span(&na.p_q)
    clear_span(&na.p_tag)
    clear_span(&na.p_instance)
    clear_span(&na.p_regid)
    na.params.off = -1
    na.params.length = 0
    na.quoted = na.star = na.bracketed = 0
    pos = skip_lws(buf, pos, end)
    na.raw.off = pos
    if pos >= end:
        err_pos[0] = pos
        return -1
    if buf[pos] == b'*':
        p = skip_lws(buf, pos + 1, end)
        if p >= end or (in_list and buf[p] == b','):
            na.star = 1
            na.uri.off = pos
            na.uri.length = 1
            na.raw.length = 1
            return p + 1 if p < end else p
    if buf[pos] == b'"':
        s = pos
        pos = scan_quoted(buf, pos, end, True, &escaped)
        if pos < 0:
            err_pos[0] = s
            return -1
        na.display.off = s
        na.display.length = pos - s
        na.quoted = 1
        pos = skip_lws(buf, pos, end)
        if pos >= end or buf[pos] != b'<':
            err_pos[0] = pos
            return -1
    else:
        # *(token LWS) "<"  or an addr-spec
        p = pos
        while p < end and (CC[<unsigned char>buf[p]] & (C_TOKEN | C_LWS)):
            p += 1
        if p < end and buf[p] == b'<':
            if p > pos:
                na.display = trim(buf, pos, p)
            pos = p
    if buf[pos] == b'<':
        na.bracketed = 1
        s = pos + 1
        p = s
        while p < end and buf[p] != b'>':
            if not (CC[<unsigned char>buf[p]] & C_URIC):
                err_pos[0] = p
                return -1
            p += 1
        if p >= end or p == s:
            err_pos[0] = p
            return -1
        na.uri.off = s
        na.uri.length = p - s
        pos = skip_lws(buf, p + 1, end)
    else:
        s = pos
        p = pos
        while p < end and CC[<unsigned char>buf[p]] & C_URIC and buf[p] != b';' \
                and buf[p] != b',' and buf[p] != b'?':
            p += 1
        if p < end and buf[p] == b'?':
            err_pos[0] = p      # a URI with headers needs the <> form
            return -1
        na.uri.off = s
        na.uri.length = p - s
        pos = skip_lws(buf, p, end)
    if scheme_end(buf, na.uri.off, na.uri.off + na.uri.length) < 0:
        err_pos[0] = na.uri.off
        return -1
    pos = scan_params_until(buf, pos, end, in_list, na, err_pos)
    if pos < 0:
        return -1
    p = pos - 1 if (pos > 0 and pos <= end and buf[pos - 1] == b',') else pos
    na.raw.length = trim(buf, na.raw.off, p).length
    return pos


cdef Py_ssize_t scheme_end(const char* buf, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Index of the ':' after a URI scheme, or -1."""
    cdef Py_ssize_t p = s
    if p >= e or not (b'a' <= LOWER[<unsigned char>buf[p]] <= b'z'):
        return -1
    while p < e and CC[<unsigned char>buf[p]] & C_SCHEME:
        p += 1
    if p >= e or buf[p] != b':' or p + 1 >= e:
        return -1
    return p


cdef int check_escapes(const char* buf, Py_ssize_t s, Py_ssize_t e, unsigned char allowed,
                       Py_ssize_t* err_pos) noexcept nogil:
    cdef Py_ssize_t p = s
    while p < e:
        if not (UC[<unsigned char>buf[p]] & allowed):
            err_pos[0] = p
            return -1
        if buf[p] == b'%':
            if p + 2 >= e:
                err_pos[0] = p
                return -1
            if HEXVAL[<unsigned char>buf[p + 1]] < 0 or HEXVAL[<unsigned char>buf[p + 2]] < 0:
                err_pos[0] = p
                return -1
            p += 3
            continue
        p += 1
    return 0


cdef int scan_sip_uri(const char* buf, Py_ssize_t s, Py_ssize_t e, UriSpans* u,
                      Py_ssize_t* err_pos) noexcept nogil:
    """SIP-URI / SIPS-URI (RFC 3261 25.1): returns 0, -1 (malformed, err_pos set)
    or -2 (another scheme)."""
    cdef Py_ssize_t p, at, c, hs, colon, pwd
    cdef int64_t port
    c = scheme_end(buf, s, e)
    if c < 0:
        err_pos[0] = s
        return -1
    u.scheme.off = s
    u.scheme.length = c - s
    if ieq(buf + s, c - s, b"sip", 3):
        u.sips = 0
    elif ieq(buf + s, c - s, b"sips", 4):
        u.sips = 1
    else:
        return -2
    p = c + 1
    u.user.off = -1
    u.user.length = 0
    u.password.off = -1
    u.password.length = 0
    u.port = -1
    # userinfo: everything up to the first '@' (a user may hold ';' and '?')
    at = -1
    for hs in range(p, e):
        if buf[hs] == b'@':
            at = hs
            break
    if at >= 0:
        colon = -1
        for pwd in range(p, at):
            if buf[pwd] == b':':
                colon = pwd
                break
        u.user.off = p
        u.user.length = (colon if colon >= 0 else at) - p
        if check_escapes(buf, p, p + u.user.length, U_USER, err_pos) < 0:
            return -1
        if colon >= 0:
            u.password.off = colon + 1
            u.password.length = at - colon - 1
            if check_escapes(buf, colon + 1, at, U_PASS, err_pos) < 0:
                return -1
        p = at + 1
    # host
    hs = p
    if p < e and buf[p] == b'[':
        p += 1
        while p < e and UC[<unsigned char>buf[p]] & U_IPV6:
            p += 1
        if p >= e or buf[p] != b']' or p == hs + 1:
            err_pos[0] = p
            return -1
        p += 1
    else:
        while p < e and UC[<unsigned char>buf[p]] & U_HOST:
            p += 1
    if p == hs:
        err_pos[0] = p
        return -1
    u.host.off = hs
    u.host.length = p - hs
    if p < e and buf[p] == b':':
        colon = p + 1
        p = colon
        while p < e and CC[<unsigned char>buf[p]] & C_DIGIT:
            p += 1
        port = parse_uint(buf, colon, p, -1)
        if port < 0 or port > 65535:
            err_pos[0] = colon
            return -1
        u.port = <int>port
    # uri-parameters
    u.params.off = p
    while p < e and buf[p] == b';':
        p += 1
        hs = p
        while p < e and (UC[<unsigned char>buf[p]] & U_PARAM or buf[p] == b'='):
            p += 1
        if p == hs or check_escapes(buf, hs, p, U_PARAM | U_USER, err_pos) < 0:
            err_pos[0] = p if p == hs else err_pos[0]
            return -1
    u.params.length = p - u.params.off
    u.headers.off = -1
    u.headers.length = 0
    if p < e and buf[p] == b'?':
        p += 1
        u.headers.off = p
        hs = p
        while p < e and (UC[<unsigned char>buf[p]] & U_HDR or buf[p] == b'=' or buf[p] == b'&'):
            p += 1
        if check_escapes(buf, hs, p, U_HDR | U_PARAM | U_USER, err_pos) < 0:
            return -1
        u.headers.length = p - hs
    if p != e:
        err_pos[0] = p
        return -1
    return 0


cdef Py_ssize_t parse_via(const char* buf, Py_ssize_t pos, Py_ssize_t end, ViaSpans* v,
                          Py_ssize_t* err_pos) noexcept nogil:
    """via-parm = sent-protocol LWS sent-by *( SEMI via-params ), then ',' or the end."""
    cdef Py_ssize_t s, p
    cdef int64_t port
    cdef Span name, value
    pos = skip_lws(buf, pos, end)
    v.raw.off = pos
    s = pos
    pos = skip_token(buf, pos, end)
    v.protocol.off = s
    v.protocol.length = pos - s
    pos = skip_lws(buf, pos, end)
    if v.protocol.length == 0 or pos >= end or buf[pos] != b'/':
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos + 1, end)
    s = pos
    pos = skip_token(buf, pos, end)
    v.version.off = s
    v.version.length = pos - s
    pos = skip_lws(buf, pos, end)
    if v.version.length == 0 or pos >= end or buf[pos] != b'/':
        err_pos[0] = pos
        return -1
    pos = skip_lws(buf, pos + 1, end)
    s = pos
    pos = skip_token(buf, pos, end)
    v.transport.off = s
    v.transport.length = pos - s
    p = pos
    pos = skip_lws(buf, pos, end)
    if v.transport.length == 0 or pos == p or pos >= end:
        err_pos[0] = pos
        return -1
    s = pos
    if buf[pos] == b'[':
        pos += 1
        while pos < end and UC[<unsigned char>buf[pos]] & U_IPV6:
            pos += 1
        if pos >= end or buf[pos] != b']':
            err_pos[0] = pos
            return -1
        pos += 1
    else:
        while pos < end and UC[<unsigned char>buf[pos]] & U_HOST:
            pos += 1
    if pos == s:
        err_pos[0] = pos
        return -1
    v.host.off = s
    v.host.length = pos - s
    v.port = -1
    pos = skip_lws(buf, pos, end)
    if pos < end and buf[pos] == b':':
        pos = skip_lws(buf, pos + 1, end)
        s = pos
        while pos < end and CC[<unsigned char>buf[pos]] & C_DIGIT:
            pos += 1
        port = parse_uint(buf, s, pos, -1)
        if port < 0 or port > 65535:
            err_pos[0] = s
            return -1
        v.port = <int>port
        pos = skip_lws(buf, pos, end)
    v.params.off = pos
    clear_span(&v.branch)
    while pos < end and buf[pos] == b';':
        pos = scan_param(buf, pos, end, &name, &value, err_pos)
        if pos < 0:
            return -1
        if name.length == 6 and ieq(buf + name.off, 6, b"branch", 6):
            v.branch = value
    v.params.length = trim(buf, v.params.off, pos).length
    v.raw.length = trim(buf, v.raw.off, pos).length
    if pos < end:
        if buf[pos] != b',':
            err_pos[0] = pos
            return -1
        return pos + 1
    return pos


# --------------------------------------------------------------------------
# Python-visible values
# --------------------------------------------------------------------------



cdef int conflicting(const char* buf, const Msg* m, int htype) noexcept nogil:
    """The index of the first header of a single-valued type that occurs again
    with another value, or -1 (also when the type is absent)."""
    cdef int i = m.first[htype], j
    cdef const Header* a
    cdef const Header* b
    if i < 0:
        return -1
    a = &m.hdrs[i]
    for j in range(i + 1, m.nheaders):
        b = &m.hdrs[j]
        if b.htype == htype and (b.val_len != a.val_len or
                                 memcmp(buf + a.val_off, buf + b.val_off, a.val_len) != 0):
            return j
    return -1


cdef enum CSeqErr:
    CSEQ_OK = 0
    CSEQ_TOO_LARGE = 1       # the number is above 2**32-1
    CSEQ_BAD = 2             # no number, or no LWS after it
    CSEQ_BAD_METHOD = 3      # no method token, or something after it


cdef int scan_cseq(const char* buf, Py_ssize_t s, Py_ssize_t e, int64_t* seq, Span* method,
                   Py_ssize_t* err_pos) noexcept nogil:
    """CSeq = 1*DIGIT LWS Method: a CSeqErr (``err_pos`` where it went wrong)."""
    cdef Py_ssize_t p = s, ms
    while p < e and CC[<unsigned char>buf[p]] & C_DIGIT:
        p += 1
    seq[0] = parse_uint(buf, s, p, -1)
    if seq[0] == -2:
        err_pos[0] = s
        return CSEQ_TOO_LARGE
    ms = skip_lws(buf, p, e)
    if seq[0] < 0 or ms == p:
        err_pos[0] = p
        return CSEQ_BAD
    p = skip_token(buf, ms, e)
    if p == ms or p != e:
        err_pos[0] = p
        return CSEQ_BAD_METHOD
    method.off = ms
    method.length = p - ms
    return CSEQ_OK

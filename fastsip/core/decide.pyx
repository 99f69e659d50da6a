
# --------------------------------------------------------------------------
# The REGISTER decision (RFC 3261 10.3).  Reading (read_*) checks what the
# request says; decide() weighs it against a read view of the AOR's bindings
# and the settings and returns a plan or a refusal.  Nothing here touches a
# store, a clock or Python objects: the registrar (registrar.pyx) runs the
# steps, the store applies the plan (store.pyx: Store.apply).
# --------------------------------------------------------------------------

# Every refusal the registrar core can answer with: (status, reason, counted
# as a parse error).  Indexed by Refusal (decide.pxd).
REFUSALS = (
    (0, b"", False),
    (416, b"Unsupported URI Scheme", False),
    (400, b"Bad Request-URI", True),
    (400, b"Missing Via header", False),
    (400, b"Missing From header", False),
    (400, b"Missing To header", False),
    (400, b"Missing Call-ID header", False),
    (400, b"Missing CSeq header", False),
    (400, b"Bad Via header", True),
    (400, b"Bad To header", True),
    (400, b"To must hold a SIP or SIPS URI", False),
    (400, b"Bad To URI", False),
    (400, b"Bad Require header", False),
    (420, b"Bad Extension", False),
    (400, b"Bad CSeq header", True),
    (400, b"Bad Call-ID header", True),
    (400, f"Call-ID longer than {MAX_CALL_ID} bytes".encode(), False),
    (400, f"Path longer than {MAX_PATH} bytes".encode(), False),
    (400, b"Conflicting Call-ID, CSeq, To or From headers", True),
    (400, f"AOR longer than {MAX_AOR} bytes".encode(), False),
    (400, b"Bad Contact header", True),
    (400, f"More than {MAX_REQUEST_CONTACTS} Contact values".encode(), False),
    (400, f"Contact URI longer than {MAX_CONTACT_URI} bytes".encode(), False),
    (400, b"Bad Contact URI", True),
    (400, b"Bad q parameter in Contact", True),
    (400, f"+sip.instance longer than {MAX_INSTANCE} bytes".encode(), False),
    (400, b"Bad reg-id parameter in Contact", True),
    (400, b"Contact: * needs Expires: 0 and no other Contact", False),
    (400, b"CSeq not higher than the binding's", False),
    (423, b"Interval Too Brief", False),
    (400, b"CSeq lower than the binding's", False),
    (503, b"Too many contacts for this AOR", False),
    (404, b"Not Found (domain not served here)", False),
    (405, b"Method Not Allowed", False),
    (400, b"Bad Authorization header", False),
    (503, b"Registrar full (max_bindings)", False),
    (403, b"Too many failed attempts", False),
)
assert len(REFUSALS) == RF__COUNT


cdef int read_target(const Req* rq, RegisterIn* reg) noexcept nogil:
    """RFC 3261 10.3 step 1 and 8.2: the Request-URI, the headers every request
    needs, Via, and the To URI (step 5, first half).  A Refusal."""
    cdef const char* buf = rq.buf
    cdef Msg* m = rq.m
    cdef Py_ssize_t err = 0
    cdef int rc, i
    cdef Header* h
    cdef ViaSpans via
    cdef NameAddr to
    rc = scan_sip_uri(buf, m.uri.off, m.uri.off + m.uri.length, &reg.ruri, &err)
    if rc == -2:
        return RF_URI_SCHEME
    if rc != 0:
        return RF_BAD_RURI
    rc = missing_header(m)
    if rc:
        return rc
    h = &m.hdrs[m.first[<int>HDR_VIA]]
    if parse_via(buf, h.val_off, h.val_off + h.val_len, &via, &err) < 0:
        return RF_BAD_VIA
    h = &m.hdrs[m.first[<int>HDR_TO]]
    if parse_name_addr(buf, h.val_off, h.val_off + h.val_len, &to, False, &err) < 0:
        return RF_BAD_TO
    rc = scan_sip_uri(buf, to.uri.off, to.uri.off + to.uri.length, &reg.to_uri, &err)
    if rc == -2:
        return RF_TO_NOT_SIP
    if rc != 0:
        return RF_BAD_TO_URI
    return RF_NONE


cdef int missing_header(const Msg* m) noexcept nogil:
    """RF_MISSING_* for the first of Via, From, To, Call-ID, CSeq that is absent."""
    if m.first[<int>HDR_VIA] < 0:
        return RF_MISSING_VIA
    if m.first[<int>HDR_FROM] < 0:
        return RF_MISSING_FROM
    if m.first[<int>HDR_TO] < 0:
        return RF_MISSING_TO
    if m.first[<int>HDR_CALL_ID] < 0:
        return RF_MISSING_CALL_ID
    if m.first[<int>HDR_CSEQ] < 0:
        return RF_MISSING_CSEQ
    return RF_NONE


cdef int read_dialog(const Req* rq, RegisterIn* reg) noexcept nogil:
    """CSeq (a REGISTER's), Call-ID, Path within their limits, and no
    conflicting copies of Call-ID, CSeq, To, From.  A Refusal."""
    cdef const char* buf = rq.buf
    cdef Msg* m = rq.m
    cdef Header* h
    cdef Span method
    cdef Py_ssize_t err = 0, k = -1
    cdef int i
    h = &m.hdrs[m.first[<int>HDR_CSEQ]]
    if scan_cseq(buf, h.val_off, h.val_off + h.val_len, &reg.cseq, &method, &err) != CSEQ_OK \
            or method.length != 8 or memcmp(buf + method.off, b"REGISTER", 8) != 0:
        return RF_BAD_CSEQ
    h = &m.hdrs[m.first[<int>HDR_CALL_ID]]
    reg.call_id.off = h.val_off
    reg.call_id.length = h.val_len
    if bad_call_id(buf, h.val_off, h.val_off + h.val_len) >= 0:
        return RF_BAD_CALL_ID
    if h.val_len > MAX_CALL_ID:
        return RF_LONG_CALL_ID
    for i in range(m.nheaders):
        if m.hdrs[i].htype == HDR_PATH:
            k += m.hdrs[i].val_len + 1     # stored one per line
    if k > MAX_PATH:
        return RF_LONG_PATH
    if conflicting(buf, m, HDR_CALL_ID) >= 0 or conflicting(buf, m, HDR_CSEQ) >= 0 or \
            conflicting(buf, m, HDR_TO) >= 0 or conflicting(buf, m, HDR_FROM) >= 0:
        return RF_CONFLICT
    return RF_NONE


cdef int read_contacts(const Req* rq, RegisterIn* reg) noexcept nogil:
    """The Expires header and every Contact value (steps 6-7, syntax only:
    nothing is decided here).  A Refusal."""
    cdef const char* buf = rq.buf
    cdef Msg* m = rq.m
    cdef Header* h
    cdef NameAddr na
    cdef Py_ssize_t err = 0, pos, end
    cdef int i, j, rc
    # delta-seconds; malformed counts as 3600 (RFC 3261 10.2.1.1)
    reg.hdr_expires = -1
    j = m.first[<int>HDR_EXPIRES]
    if j >= 0:
        h = &m.hdrs[j]
        reg.hdr_expires = parse_uint(buf, h.val_off, h.val_off + h.val_len, 0xFFFFFFFF)
        if reg.hdr_expires < 0:
            reg.hdr_expires = 3600
    reg.star = False
    reg.ncontacts = 0
    j = m.first[<int>HDR_CONTACT]
    if j < 0:
        return RF_NONE
    for i in range(j, m.nheaders):
        h = &m.hdrs[i]
        if h.htype != HDR_CONTACT:
            continue
        pos = h.val_off
        end = h.val_off + h.val_len
        while pos < end:
            pos = parse_name_addr(buf, pos, end, &na, True, &err)
            if pos < 0 or (pos == end and buf[pos - 1] == b','):
                return RF_BAD_CONTACT
            if reg.ncontacts == MAX_REQUEST_CONTACTS:
                return RF_MANY_CONTACTS
            if na.star:
                reg.star = True
            rc = read_contact(buf, &na, &reg.contacts[reg.ncontacts])
            if rc:
                return rc
            reg.ncontacts += 1
    return RF_NONE


cdef int read_contact(const char* buf, const NameAddr* na, ContactIn* c) noexcept nogil:
    """One Contact value's URI and parameters.  A Refusal."""
    cdef UriSpans u
    cdef Py_ssize_t err = 0
    cdef int q
    c.uri = na.uri
    c.instance.off = -1
    c.instance.length = 0
    c.reg_id = -1
    c.q = -1
    c.requested = -1
    c.key = 0
    if na.star:
        return RF_NONE
    if na.uri.length > MAX_CONTACT_URI:
        return RF_LONG_CONTACT
    if scan_sip_uri(buf, na.uri.off, na.uri.off + na.uri.length, &u, &err) == -1:
        return RF_BAD_CONTACT_URI
    c.key = uri_key_hash(buf, na.uri.off, na.uri.off + na.uri.length)
    if na.p_expires.off >= 0:
        c.requested = parse_uint(buf, na.p_expires.off, na.p_expires.off + na.p_expires.length,
                                 0xFFFFFFFF)
        if c.requested < 0:
            c.requested = 3600     # malformed: RFC 3261 10.2.1.1
    if na.p_q.off >= 0:
        q = parse_qvalue(buf, na.p_q.off, na.p_q.off + na.p_q.length)
        if q < 0:
            return RF_BAD_Q
        c.q = <int16_t>q
    if na.p_instance.off >= 0:
        c.instance = na.p_instance
        if na.p_instance.length >= 2 and buf[na.p_instance.off] == b'"':
            c.instance.off += 1
            c.instance.length -= 2
        if c.instance.length > MAX_INSTANCE:
            return RF_LONG_INSTANCE
    if na.p_regid.off >= 0:
        c.reg_id = parse_uint(buf, na.p_regid.off, na.p_regid.off + na.p_regid.length, -1)
        if c.reg_id < 0:
            return RF_BAD_REG_ID
    return RF_NONE


cdef inline bint same_bytes(const char* a, Py_ssize_t an, const char* b,
                            Py_ssize_t bn) noexcept nogil:
    return an == bn and memcmp(a, b, an) == 0


cdef int decide(const char* buf, const RegisterIn* reg, const Settings* s, const AorView* v,
                int64_t stored, double now, Plan* plan) noexcept nogil:
    """Steps 6-8 against the AOR's bindings ``v`` (valid at ``now``; the store
    holds ``stored`` bindings in all): the plan, or a Refusal (then ``plan`` is
    not to be applied)."""
    cdef int i, k, j, added = 0, removed = 0
    cdef int64_t e
    cdef const ContactIn* c
    cdef const BindingView* b
    cdef Change* ch
    cdef int32_t match[MAX_REQUEST_CONTACTS]
    cdef uint8_t action[MAX_REQUEST_CONTACTS]
    cdef int64_t expires[MAX_REQUEST_CONTACTS]
    plan.retransmission = False
    plan.remove_all = False
    plan.outbound = False
    plan.nchanges = 0

    if reg.star:
        # Contact: * must stand alone, with Expires: 0 (step 6).
        if reg.ncontacts != 1 or reg.hdr_expires != 0:
            return RF_BAD_STAR
        for j in range(v.n):
            b = &v.b[j]
            if same_bytes(b.call_id, b.call_id_len, buf + reg.call_id.off, reg.call_id.length) \
                    and <int64_t>b.cseq >= reg.cseq:
                return RF_STAR_CSEQ
        plan.remove_all = True
        return RF_NONE

    # 7. Each contact's expiry: its parameter, else the header, else the
    # default; capped at max_expires; below the minimum (but 0): 423.
    for i in range(reg.ncontacts):
        c = &reg.contacts[i]
        e = c.requested if c.requested >= 0 else \
            reg.hdr_expires if reg.hdr_expires >= 0 else s.default_expires
        if e > s.max_expires:
            e = s.max_expires
        if 0 < e < s.min_expires:
            return RF_TOO_BRIEF
        if c.reg_id >= 0 and c.instance.length > 0 and e > 0:
            plan.outbound = True
        expires[i] = e
        ch = &plan.changes[i]
        ch.b.expires_at = now + e
        ch.b.key_hash = c.key
        ch.b.reg_id = c.reg_id
        ch.b.q = c.q
        ch.b.uri = buf + c.uri.off
        ch.b.uri_len = c.uri.length
        ch.b.instance = buf + c.instance.off if c.instance.off >= 0 else NULL
        ch.b.instance_len = c.instance.length

    # Match each contact with the AOR's bindings: the same URI (19.1.4), or
    # the same +sip.instance and reg-id (RFC 5626: the flow's binding moves).
    for i in range(reg.ncontacts):
        c = &reg.contacts[i]
        match[i] = -1
        for j in range(v.n):
            b = &v.b[j]
            if b.key_hash == c.key or (c.instance.length > 0 and b.reg_id == c.reg_id and
                                       same_bytes(b.instance, b.instance_len,
                                                  buf + c.instance.off, c.instance.length)):
                match[i] = j
                break
        for k in range(i):      # a contact repeated in one request: the last one counts
            if action[k] != 0 and (
                    reg.contacts[k].key == c.key or (match[i] >= 0 and match[k] == match[i]) or
                    (c.instance.length > 0 and reg.contacts[k].reg_id == c.reg_id and
                     same_bytes(buf + reg.contacts[k].instance.off,
                                reg.contacts[k].instance.length,
                                buf + c.instance.off, c.instance.length))):
                action[k] = 0
                if match[k] < 0:
                    added -= 1
        if match[i] >= 0:
            b = &v.b[match[i]]
            if same_bytes(b.call_id, b.call_id_len, buf + reg.call_id.off, reg.call_id.length):
                if reg.cseq < <int64_t>b.cseq:
                    return RF_CSEQ_LOWER
                if reg.cseq == <int64_t>b.cseq:
                    plan.retransmission = True
            action[i] = A_REMOVE if expires[i] == 0 else A_UPDATE
        else:
            action[i] = 0 if expires[i] == 0 else A_ADD
            if action[i] == A_ADD:
                added += 1
    if plan.retransmission:
        # A request already processed (its reply may have been lost): the
        # same answer, nothing changes.
        return RF_NONE
    for i in range(reg.ncontacts):
        if action[i] == A_REMOVE:
            removed += 1
    if v.n - removed + added > s.max_contacts:
        return RF_TOO_MANY
    if s.max_bindings and added > removed and stored - removed + added > s.max_bindings:
        return RF_FULL

    # The plan: the changes in request order (plan.changes[i].b was filled above).
    for i in range(reg.ncontacts):
        if action[i] == 0:
            continue
        ch = &plan.changes[plan.nchanges]
        if plan.nchanges != i:
            ch.b = plan.changes[i].b
        ch.action = action[i]
        ch.target = match[i]
        plan.nchanges += 1
    return RF_NONE

# The seam between the REGISTER decision (decide.pyx) and storage
# (store.pyx): a request struct, a read view of an AOR's bindings, and the
# plan the decision returns.  The decision reads a view and writes a plan; it
# never touches a store.  A store applies a plan all-or-nothing.

cdef enum:
    MAX_AOR = 255
    MAX_CONTACT_URI = 512
    MAX_CALL_ID = 255
    MAX_INSTANCE = 255
    MAX_PATH = 1024
    MAX_USER_AGENT = 255
    MAX_REQUEST_CONTACTS = 64
    MAX_LISTED = 256              # bindings one AOR may hold (the 200 lists them all)


# What the registrar hands the store for one binding (pointers into its buffers).
cdef struct BindingIn:
    double expires_at
    uint64_t key_hash
    uint32_t cseq
    int64_t reg_id
    int64_t conn_id
    int16_t q
    uint8_t transport
    uint16_t src_port
    const char* uri
    Py_ssize_t uri_len
    const char* call_id
    Py_ssize_t call_id_len
    const char* instance
    Py_ssize_t instance_len
    const char* path
    Py_ssize_t path_len
    const char* ua
    Py_ssize_t ua_len
    const char* src_host
    Py_ssize_t src_host_len



# One request being answered: the datagram, its scan, where it came from, when.
cdef struct Req:
    const char* buf
    Py_ssize_t n
    Msg* m
    const char* src_host          # ASCII, as the reply's Via received= carries it
    Py_ssize_t src_host_len
    int src_port
    double now
    uint8_t transport             # Transport (store.pxd)
    int64_t conn_id               # stream connection, -1 for UDP


# One Contact value of a REGISTER, as read (syntax checked, nothing decided).
cdef struct ContactIn:
    Span uri
    Span instance                 # unquoted content of +sip.instance, off -1 when absent
    uint64_t key                  # uri_key_hash of the URI
    int64_t requested             # its expires parameter (malformed: 3600), -1 when absent
    int64_t reg_id                # -1 when absent
    int16_t q                     # thousandths, -1 when absent


# What a REGISTER says, read from the message (decide.pyx: read_*).
cdef struct RegisterIn:
    UriSpans ruri
    UriSpans to_uri
    Span call_id
    int64_t cseq
    int64_t hdr_expires           # the Expires header (malformed: 3600), -1 when absent
    bint star                     # Contact: *
    int ncontacts
    Py_ssize_t aor_len
    char aor[MAX_AOR + 1]
    ContactIn contacts[MAX_REQUEST_CONTACTS]


# One binding of an AOR as the decision sees it (pointers into the store).
cdef struct BindingView:
    int32_t id                    # the store's handle for it (a slot)
    double expires_at
    uint64_t key_hash
    uint32_t cseq
    int64_t reg_id
    int16_t q
    const char* uri
    Py_ssize_t uri_len
    const char* call_id
    Py_ssize_t call_id_len
    const char* instance
    Py_ssize_t instance_len


# The bindings of one AOR that are valid at `now`, in registration order.
cdef struct AorView:
    int n
    BindingView b[MAX_LISTED]


cdef enum Action:
    A_ADD = 1
    A_UPDATE = 2
    A_REMOVE = 3


cdef struct Change:
    uint8_t action
    int32_t target                # A_UPDATE / A_REMOVE: index into the view decided on
    BindingIn b                   # A_ADD / A_UPDATE: the binding to write


# What a REGISTER changes.  Bindings not named stay as they are.
cdef struct Plan:
    bint retransmission           # already processed: nothing changes, the same 200
    bint remove_all               # Contact: * with Expires: 0
    bint outbound                 # an RFC 5626 flow was registered (Require: outbound)
    int nchanges
    Change changes[MAX_REQUEST_CONTACTS]

# The REGISTER decision's types (decide.pyx).  Plan, view and request
# structs are in plan.pxd.

# Why a request is refused (REFUSALS in decide.pyx gives status and reason).
cdef enum Refusal:
    RF_NONE = 0
    RF_URI_SCHEME
    RF_BAD_RURI
    RF_MISSING_VIA
    RF_MISSING_FROM
    RF_MISSING_TO
    RF_MISSING_CALL_ID
    RF_MISSING_CSEQ
    RF_BAD_VIA
    RF_BAD_TO
    RF_TO_NOT_SIP
    RF_BAD_TO_URI
    RF_BAD_REQUIRE
    RF_EXTENSION
    RF_BAD_CSEQ
    RF_BAD_CALL_ID
    RF_LONG_CALL_ID
    RF_LONG_PATH
    RF_CONFLICT
    RF_LONG_AOR
    RF_BAD_CONTACT
    RF_MANY_CONTACTS
    RF_LONG_CONTACT
    RF_BAD_CONTACT_URI
    RF_BAD_Q
    RF_LONG_INSTANCE
    RF_BAD_REG_ID
    RF_BAD_STAR
    RF_STAR_CSEQ
    RF_TOO_BRIEF
    RF_CSEQ_LOWER
    RF_TOO_MANY
    RF_NOT_FOUND
    RF_METHOD
    RF_BAD_AUTHORIZATION
    RF_FULL
    RF_THROTTLED
    RF__COUNT


# The registrar's settings the decision reads.
cdef struct Settings:
    int min_expires
    int max_expires
    int default_expires
    int max_contacts
    int64_t max_bindings          # bindings the whole store may hold, 0: no limit

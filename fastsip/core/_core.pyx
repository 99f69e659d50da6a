# cython: freethreading_compatible=False
"""fastsip's pure layer, compiled as one module: bytes, a source and ``now``
in, bytes out.  No clock, socket or file is touched here.

The module is assembled from one file per job, as uvloop assembles its loop,
so that the lexer's tables and inline scanners are shared without a call
through a module boundary.  Each part has its declarations in the .pxd of
the same name.

    lexer        character tables, LWS, tokens, quoted strings, escapes, numbers
    scan         one pass over a message: start line, header table, body
    values       name-addr, Via, SIP URI, parameters, token lists
    credentials  Authorization / WWW-Authenticate values
    hashing      SipHash, URI comparison keys, canonical AORs, shards
    objects      typed header values (Address, Via, CSeq, SipURI)
    message      SipMessage, Request, Response, Headers, Parser, parse
    framer       StreamFramer (TCP)
    plan         (.pxd only) the seam: request, AOR view, plan
    table        AOR table, binding slab, expiry heap, change list; applies plans
    record       an AOR's bindings as one record (the change feed, the state file)
    store        Store (the table's Python API), Binding
    throttle     the failure budget of digest authentication
    digest       the digest check (AuthCore, AuthResult)
    decide       the REGISTER decision: read the request, decide on a view
    reply        the reply writer (every response), make_response
    registrar    RegistrarCore: runs the steps, dispatches every datagram
    websocket    WsFramer: WebSocket frames of a server connection (RFC 6455, 7118)

Errors are the classes of ``fastsip.errors``; the public faces are
``fastsip.parser``, ``fastsip.registrar`` and ``fastsip.auth``.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.math cimport INFINITY, fabs
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from libc.time cimport gmtime, time_t, tm

import os

from fastsip import errors as _errors

include "lexer.pyx"
include "scan.pyx"
include "values.pyx"
include "credentials.pyx"
include "hashing.pyx"
include "objects.pyx"
include "message.pyx"
include "framer.pyx"
include "table.pyx"
include "record.pyx"
include "store.pyx"
include "throttle.pyx"
include "digest.pyx"
include "decide.pyx"
include "reply.pyx"
include "registrar.pyx"
include "websocket.pyx"

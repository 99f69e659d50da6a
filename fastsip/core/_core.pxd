# Declarations of fastsip's compiled core, one .pxd per job (see _core.pyx).
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

include "lexer.pxd"
include "scan.pxd"
include "values.pxd"
include "credentials.pxd"
include "hashing.pxd"
include "message.pxd"
include "plan.pxd"
include "table.pxd"
include "record.pxd"
include "store.pxd"
include "throttle.pxd"
include "digest.pxd"
include "decide.pxd"
include "reply.pxd"
include "registrar.pxd"
include "websocket.pxd"

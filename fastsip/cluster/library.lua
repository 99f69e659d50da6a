#!lua name=fastsip
-- fastsip's shared location on Redis (docs/cluster.md).  One key per AOR,
-- fs:r:{AOR}, holding the AOR's record (docs/record.md): byte 1 is the record
-- format, bytes 2..9 the AOR's version (u64, little-endian), written by the
-- node that decided the change.  Loaded with FUNCTION LOAD REPLACE on every
-- primary: functions are replicated and survive a failover.

-- fastsip_cas KEY EXPECTED RECORD PXAT
--   EXPECTED  the 8 version bytes the node decided against, "" for no key
--   RECORD    the AOR's new record, "" to delete the key (no binding left)
--   PXAT      when the key expires, Unix milliseconds (latest expiry + grace)
-- Returns 1 when written.  Otherwise the version did not match: the key's
-- current value (nil when there is none), for the node to decide again.
redis.register_function('fastsip_cas', function(keys, args)
    local current = redis.call('GET', keys[1])
    local version = current and string.sub(current, 2, 9) or ''
    if version ~= args[1] then
        return current
    end
    if args[2] == '' then
        redis.call('DEL', keys[1])
    else
        redis.call('SET', keys[1], args[2], 'PXAT', args[3])
    end
    -- the write ended this client's tracking of the key (CLIENT TRACKING):
    -- read it again so that another node's next write invalidates our copy
    redis.call('EXISTS', keys[1])
    return 1
end)

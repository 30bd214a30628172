"""The blkif protocol, sans-I/O: pure functions and objects over buffers.

No system calls, no trio: the backend hands in memoryviews of mapped ring
pages and bytes it copied out of guest pages; everything here is fuzzed.

Modules, bottom up:
    constants  ops, statuses, limits, flags, protocol names (blkif.h)
    abi        Abi enum; per-ABI struct tables and precompiled Structs;
               ring_entries(abi, order); abi_for_protocol(name | None)
    request    Request / DiscardRequest / IndirectRequest / Rejection
    response   Response; encode_response / decode_response
    ring       BackRing / FrontRing: indices, slot copies, notifications
    decode     RequestDecoder: slot bytes -> request, protocol rules
    validate   RequestLimits, Validator: device rules; indirect segments
    intake     RequestIntake: one ring drain = copy once, decode, validate
    encode     RequestEncoder: the frontend's side, hostile values allowed

A backend ring task, per wake-up:
    items = intake.take(ring, max_count)    # RingOverflow -> halt this ring
    ... execute / ring.put_response(item.id, item.response_op, status) ...
    if ring.push_responses(): notify
    if not ring.final_check_for_requests(): sleep until the event channel fires
"""

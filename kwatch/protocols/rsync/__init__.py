"""A native rsync wire-protocol client (push side), sans-IO.

- ``codec``     ints, varint/varlong, vstrings, file-list indexes, the multiplex framing (MSG_DATA, MSG_ERROR...).
- ``flist``     file-list entries with the XMIT_* flags, the end marker and rsync's sort order.
- ``checksum``  the negotiated strong sums (xxh128/xxh3/xxh64/md5/sha1), name negotiation, daemon auth.
- ``weak``      the rolling checksum1 (numpy, bulk).
- ``tokens``    the receiver's block checksums and the literal/match tokens made against them (pure data).
- ``match``     the sender's block matching against the receiver's checksums (numpy, bulk); imported only when a
                file has a basis to match, so a transfer of new files does not import numpy.
- ``client``    the push session state machine: daemon greeting, module, auth, args, setup, file list,
                checksums in, tokens out, phases and goodbye.

The I/O edge that drives it over TCP or an ssh pipe is :mod:`kwatch.replicate.rsync_transport`.
"""

"""A native rsync wire-protocol client (push side), sans-IO.

- ``codec``     ints, varint/varlong, vstrings, file-list indexes, the multiplex framing (MSG_DATA, MSG_ERROR...).
- ``flist``     file-list entries with the XMIT_* flags, the end marker and rsync's sort order.
- ``checksum``  the rolling checksum1, the negotiated strong sums (xxh128/xxh3/xxh64/md5/sha1), daemon auth.
- ``match``     the sender's block matching against the receiver's checksums (numpy, bulk).
- ``client``    the push session state machine: daemon greeting, module, auth, args, setup, file list,
                checksums in, tokens out, phases and goodbye.

The I/O edge that drives it over TCP or an ssh pipe is :mod:`kwatch.replicate.rsync_transport`.
"""

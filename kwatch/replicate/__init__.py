"""Replication: coalesce events into batches, plan operations, compute deltas, and drive transports to mirrors."""

"""Prometheus metrics: collectors that read the daemon's counters at scrape time."""

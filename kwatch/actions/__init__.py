"""Actions: run shell commands for matched events, with placeholders passed as data, never as code."""

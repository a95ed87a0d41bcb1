"""Rules: the changedfiles config format and the TOML config, parsed into one model, and rule matching. Pure code."""

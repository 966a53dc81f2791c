"""Ground floor: log lines (SPEC §7) and instance counters; imports nothing of ours."""

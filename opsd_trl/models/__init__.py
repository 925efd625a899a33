"""Model-family adapters and the tiny in-code models used by tests and the CPU quickstart."""

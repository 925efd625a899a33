"""In-code fixtures (no downloads) for tests and benchmarks: the tiny models (`tiny_models`, the `tiny:` builders of
`opsd_trl.models.tiny` under the name the tests import), the tiny BAGEL and a synthetic VT encoder.

The runtime package never imports them. Import the modules themselves: `opsd_trl.testing.tiny_models`,
`opsd_trl.testing.tiny_bagel`, `opsd_trl.testing.synthetic_encoder`, `opsd_trl.testing.pretrained` (the one non-tiny
model: SmolLM2-135M-Instruct from a package wheel, for benchmarks and the real-model recipe's test).
"""

"""SMILY: reverse image search for histopathology.

The services live under `services/` and import as `smily.tiler`, `smily.embedder`,
`smily.index`, `smily.gateway` and `smily.common`; the protos as `smily.<service>.v1`.
This folder holds what people and integrators run: the CLI, the client, the local
stack, the demo, sample slides, model tools and the evaluation.
"""

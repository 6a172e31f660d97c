"""Training the project's small default model on the procedural world (``vidloom.world``).

Two phases, each resumable from its run directory: the VAE (reconstruction + KL), then the
DiT with the flow-matching objective on pre-encoded latents and cached caption embeddings
(the UMT5 text encoder stays frozen, as Wan's is). ``python -m vidloom.train --help``.
"""

"""What a run costs and whether its known failure modes are fixed, measured on this machine.

``cost`` counts FLOPs and bytes saved for backward of a DCAL step against the plain ViT (used by
the memory checks, ``benchmarks/bench_model.py`` and the tests); ``health`` holds the warnings
the trainer logs after each epoch. The checks ``python test_fixes.py`` runs, one group per
module: ``lr`` (LR rule, warmup, cosine), ``memory`` (cost against the plain ViT, checkpointing,
no growth across steps, CUDA peak), ``learning`` (a short demo training), ``weighting``
(uncertainty weights move apart) and ``branches`` (GLCA and PWCA work as the paper says), on
models from ``probe``; ``suite`` runs them in order and ``result`` is the line each one prints.

Nothing is imported here: the trainer imports ``health`` and ``learning`` imports the trainer.
"""

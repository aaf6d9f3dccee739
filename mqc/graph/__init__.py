"""Graph rewriting helpers the passes share: quantizer insertion, modality masks, weight ownership, stream tracing.

Passes are leaves: they import these core modules, never each other (``tests/core/test_pass_imports.py``).
"""

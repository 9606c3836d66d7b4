"""Trainer integrations. Each submodule imports its framework lazily, on first use, so that
``import fused_trim`` never needs them; install the matching extra (``fused_trim[hf]``)."""

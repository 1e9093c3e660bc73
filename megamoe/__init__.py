"""megamoe: Mixture-of-Experts language-model training in the Megatron tradition."""

__version__ = "0.1.0"

"""Hugging Face interop: checkpoint conversion (convert), per-type tensor layouts (layouts),
dense -> MoE upcycling (upcycle) and vocabulary extension (vocab).

Nothing here imports transformers: config.json is read and written as JSON and weights with
safetensors, so conversion works wherever megamoe does. Tests use transformers to check that
the files load with AutoModelForCausalLM and compute the same logits.
"""

"""The models: the decoder (all families) and its attention, and their import and export (HF
safetensors, GGUF): `checkpoint.load_pretrained` / `save_pretrained`."""

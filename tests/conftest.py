import os

# DeepSpeed picks its accelerator at import; the tests always run on its CPU accelerator over gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

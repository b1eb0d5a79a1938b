"""SPEFT: a sparse delta on each targeted weight, its entries chosen by salience over calibration data.

The pieces it wires live beside the package's other components, where other methods may reuse them:
salience.py and shard_grads.py (per-shard scores), selection.py (the exact distributed top-k), delta.py and
delta_impls.py (the layer), partitioned_deltas.py (ZeRO-3 injection), masks.py (mask updates), adapter.py
(its file format). This folder is the glue the recipe reaches through speft_ds.methods.
"""

"""SPEFT: a sparse delta on each targeted weight, its entries chosen by salience over calibration data. All of
its parts live here: method.py (the glue the recipe reaches through speft_ds.methods), salience.py and
shard_grads.py (the metrics and their per-shard gradient statistics), selection.py (the exact distributed
top-k), salience_budget.py (the groups and offload chosen for --max_memory_gib), masks.py (mask updates),
delta.py and delta_impls.py (the layer and its arithmetic), partitioned_deltas.py (delta layers created under
ZeRO-3), adapter_format.py (its adapter files) and report.py (the mask tool's table and picture). Like every
method it may import config/, models/, runtime/, data/ and methods/' shared modules, never commands/ or the
top-level modules.
"""

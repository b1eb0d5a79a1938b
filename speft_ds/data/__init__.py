"""What the model is trained and scored on: datasets into batches (batches.py: loading, tokenizing,
splitting, packing, collating and each rank's micro-batches), the causal-LM loss (losses.py), the task scorer
behind --eval_task and the evaluate tool (task_eval.py) and --retention_text's measure of forgetting
(retention.py). It may import config/, models/ and runtime/, never methods/, commands/ or the top-level
modules.
"""

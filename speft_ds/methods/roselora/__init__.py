"""RoseLoRA (Wang et al., EMNLP 2024): LoRA whose factors are pruned per row of A and per column of B by a
smoothed sensitivity |w x grad|, on a cubic schedule, so that B A stays sparse (docs/methods.md says which
reading of the paper and its reference code this is)."""

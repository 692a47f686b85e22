"""Counterfactual validation: a deterministic fine-tune recipe, metagradients, the linear datamodeling score."""

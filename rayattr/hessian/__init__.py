"""Curvature statistics and their inversion; plain torch, no Ray."""

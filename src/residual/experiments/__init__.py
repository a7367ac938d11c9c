"""Experiments that show residual learning at work: degradation and gradient flow."""

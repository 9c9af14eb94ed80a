"""Optimization passes over the IR, one module per pass, run by the pass manager."""

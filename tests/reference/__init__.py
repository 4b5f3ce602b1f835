"""Tests of the pure-PyTorch reference (miras_ext.reference); shared inputs in helpers.py."""

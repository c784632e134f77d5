"""Comparison: metrics of one tap and the policies that judge them."""

"""Runnable examples of txflow services."""

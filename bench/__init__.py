"""Benchmarks of crm-events side by side with Centrifugo (issue 6). Run ``python -m bench``."""

"""Model-family adapters (`adapters.py`), the one model loader (`loading.py`) and model ports (`bagel/`)."""

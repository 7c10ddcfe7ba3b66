"""Model card templates, installed as the package data ``kron_transformers.model_cards``."""

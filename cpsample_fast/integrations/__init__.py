"""Adapters to other libraries' models (diffusers); each imports its library lazily."""

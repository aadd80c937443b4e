"""The studies behind the library's defaults: `python -m research.<study>` from the repo root."""

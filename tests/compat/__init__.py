"""The peers' own tests, ported to statekeep (see conftest.py)."""

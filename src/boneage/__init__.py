"""Paediatric bone age assessment from hand radiographs (after Iglovikov et al., DLMIA 2018)."""

__version__ = "0.1.0"

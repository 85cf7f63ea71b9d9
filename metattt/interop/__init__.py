"""Interoperability with models from outside metattt (the Parameter Golf record scripts)."""

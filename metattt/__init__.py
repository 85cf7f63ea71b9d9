"""metattt: meta-learned test-time training for small GPTs in the Parameter Golf setting."""
__version__ = "0.1.0"

"""Token reduction strategies, registered by name: image ones in ``image.py``, text ones in ``text.py``."""

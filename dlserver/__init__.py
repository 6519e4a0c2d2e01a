"""dlserver: a deep-learning frame server for Nuke.

This package's top level imports nothing: `dlserver.client` must load in Nuke's own
Python with the stdlib alone.
"""

__version__ = "0.1.0"

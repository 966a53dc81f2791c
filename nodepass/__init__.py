"""nodepass-py: the NodePass TCP/UDP tunnel as a Twisted protocol stack."""

__version__ = "0.1.0"

"""posttrain: SFT, RL with verifiable rewards, and the hybrids between them, in one trainer core."""
__version__ = "0.1.0"

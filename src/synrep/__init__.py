"""synrep: learn visual representations from generative models (StableRep, StableRep+, SynCLR, GenRep)."""

__version__ = "0.1.0"

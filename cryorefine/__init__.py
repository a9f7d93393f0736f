"""cryorefine: RELION-compatible cryo-EM single-particle 3D auto-refine."""

__version__ = "0.1.0"

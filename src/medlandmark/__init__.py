"""medlandmark: self-configuring anatomical landmark detection in world millimetres."""

from medlandmark.errors import MedlandmarkError

__version__ = "0.1.0"
__all__ = ["MedlandmarkError", "__version__"]

"""Images with their geometry, landmark file formats, and index <-> world conversions."""

from medlandmark.io.geometry import Geometry, index_to_world, world_to_index
from medlandmark.io.images import ImageData, read_image, read_image_info, write_image
from medlandmark.io.landmarks import LandmarkSet, read_landmarks, write_landmarks

__all__ = [
    "Geometry",
    "ImageData",
    "LandmarkSet",
    "index_to_world",
    "read_image",
    "read_image_info",
    "read_landmarks",
    "world_to_index",
    "write_image",
    "write_landmarks",
]

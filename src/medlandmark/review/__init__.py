"""``medlandmark review``: a local web app to check predicted landmarks and correct them into a
dataset folder that ``check`` passes and ``train --init-from`` learns from."""

from medlandmark.review.app import create_app, serve
from medlandmark.review.session import ReviewSession

__all__ = ["ReviewSession", "create_app", "serve"]

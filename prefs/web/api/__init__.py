"""The mailer API under ``/api/v1``: parse, call the domain, answer in JSON."""

from . import mailers, records  # noqa: F401 - their routes join the blueprint
from .base import bp

__all__ = ["bp"]

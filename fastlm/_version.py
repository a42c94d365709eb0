"""fastlm's version (one place; pyproject.toml carries the same number for the build)."""

__version__ = "0.1.0"

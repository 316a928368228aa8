"""Byte units shared by settings, limits and messages (one definition)."""

MIB = 1024 * 1024

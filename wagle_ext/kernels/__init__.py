"""Kernel back ends. Each back end exposes the same functions as :mod:`.reference`."""

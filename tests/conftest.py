"""Shared fixtures: a trustme CA and certificates (never committed), bounds."""

from __future__ import annotations

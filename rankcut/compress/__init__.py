"""Compression: bases from statistics (methods), how much to keep (budget), applying it (project)."""

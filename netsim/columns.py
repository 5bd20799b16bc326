"""Text tables as kubectl prints them: columns padded to their widest cell, no borders."""

from __future__ import annotations


def aligned(header: list[str], rows: list[list[str]], gap: str = "   ") -> list[str]:
    """The header and rows as lines, each cell padded to its column's width."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return [
        gap.join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header] + rows
    ]

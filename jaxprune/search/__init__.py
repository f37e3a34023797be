"""Architecture search over per-group keep ratios."""

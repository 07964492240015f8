"""Training over slow links: local steps with an outer optimizer (DiLoCo, Streaming DiLoCo) on
compressed outer gradients. See the README's "Slow links" section."""

from commlib.localsgd.diloco import DiLoCo, fragment_of, fragment_offset, fragments_due, outer_gradient

__all__ = ["DiLoCo", "fragment_of", "fragment_offset", "fragments_due", "outer_gradient"]

"""Checkpoints: written whole and streamed (`io`), loadable anywhere with the parts they carry (`portable`),
and resumed from (`resume`)."""
